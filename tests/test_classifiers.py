"""Downstream classifiers: linear probe on features, small CNN end to end, both seeded."""

import numpy as np
import pytest
import torch

from medi_dist.evaluate.classifiers import LinearProbe, SmallCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stripes_vs_dots(n: int, size: int = 32, seed: int = 0):
    """Class 'stripes' (vertical lines) vs 'dots' (a grid of small squares), random period and phase."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        p, ph = rng.integers(4, 7), rng.integers(0, 6)
        on = ((xx + ph) % p) < 2
        if y[i] == 1:
            on &= ((yy + ph) % p) < 2
        img = np.array([215, 160, 200]) + rng.normal(0, 15, (size, size, 3)) - 100 * on[..., None]
        imgs[i] = np.clip(img, 0, 255)
    return imgs, np.array(["stripes", "dots"])[y]


def test_linear_probe_separable_and_labels():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (3, 8))
    y = rng.integers(0, 3, 600)
    x = centers[y] + rng.normal(0, 0.5, (600, 8))
    names = np.array(["BRCA", "LUAD", "LUSC"])
    probe = LinearProbe(seed=0).fit(x[:400], names[y[:400]])
    pred = probe.predict(x[400:])
    assert pred.dtype.kind == "U" and np.mean(pred == names[y[400:]]) > 0.95
    np.testing.assert_array_equal(pred, LinearProbe(seed=0).fit(x[:400], names[y[:400]]).predict(x[400:]))
    assert probe.predict_proba(x[:2]).shape == (2, 3)
    # one training class (a tiny leave-sites-out split) predicts that class instead of crashing
    assert LinearProbe().fit(x[:5], ["LUAD"] * 5).predict(x[:3]).tolist() == ["LUAD"] * 3


def test_small_cnn_learns_stripes_vs_dots():
    x, y = stripes_vs_dots(320, seed=0)
    xt, yt = stripes_vs_dots(200, seed=1)
    model = SmallCNN(epochs=6, seed=0).fit(x, y)
    pred = model.predict(xt)
    assert set(pred) <= {"stripes", "dots"}
    assert np.mean(pred == yt) > 0.9
    assert model.predict_proba(xt[:3]).shape == (3, 2)


def test_small_cnn_same_seed_same_predictions():
    x, y = stripes_vs_dots(96, seed=2)
    state = torch.random.get_rng_state()
    a = SmallCNN(epochs=2, batch_size=32, seed=7).fit(x, y).predict_proba(x)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    b = SmallCNN(epochs=2, batch_size=32, seed=7).fit(x, y).predict_proba(x)
    np.testing.assert_array_equal(a, b)
    c = SmallCNN(epochs=2, batch_size=32, seed=8).fit(x, y).predict_proba(x)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="uint8"):
        SmallCNN().fit(x.astype(np.float32), y)
