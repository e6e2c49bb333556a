"""Encoders (local weights only, identical preprocessing) and Fréchet distance / conditional accuracy."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from medi_dist.evaluate import encoders as E
from medi_dist.evaluate.fidelity import (
    conditional_accuracy,
    fidelity_report,
    fidelity_table,
    frechet_distance,
    frechet_from_moments,
)


def he_tiles(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Pink/purple blobby textures, roughly H&E coloured."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        f = rng.uniform(3, 8, 2)
        nuclei = np.sin(2 * np.pi * (f[0] * xx + rng.random())) * np.sin(2 * np.pi * (f[1] * yy + rng.random())) > 0.5
        img = np.array([235, 170, 210]) + rng.normal(0, 12, (size, size, 3))
        img = img - nuclei[..., None] * np.array([120, 130, 40])
        out[i] = np.clip(img, 0, 255)
    return out


def od_shift(images: np.ndarray, strength: float) -> np.ndarray:
    """Scale optical density (stain amount) by 1 + strength: a known, monotone stain shift."""
    od = -np.log((images.astype(np.float64) + 1) / 256)
    return np.clip(256 * np.exp(-od * (1 + strength)) - 1, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- Fréchet distance


def test_closed_form_two_gaussians():
    # By hand: S1 = diag(1, 4), S2 = diag(4, 1), mu2 - mu1 = (1, 2):
    # ||d||^2 = 5, Tr(S1 + S2) = 10, Tr(sqrt(S1 S2)) = 2 + 2 -> FD = 5 + 10 - 8 = 7
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    assert frechet_from_moments(np.zeros(2), s1, np.array([1.0, 2.0]), s2) == pytest.approx(7.0)
    # Full covariances: compare with the textbook formula evaluated through scipy's sqrtm.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert frechet_from_moments(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # Sample estimate converges to the closed form.
    x = rng.multivariate_normal(np.zeros(2), np.diag([1.0, 4.0]), 40000)
    y = rng.multivariate_normal([1.0, 2.0], np.diag([4.0, 1.0]), 40000)
    assert frechet_distance(x, y) == pytest.approx(7.0, rel=0.05)


def test_self_distance_zero_and_singular_small_n():
    f = np.random.default_rng(1).normal(size=(300, 16))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    # N < D: singular covariances must still give a finite, non-negative number (no complex parts).
    a, b = np.random.default_rng(2).normal(size=(2, 6, 64))
    fd = frechet_distance(a, b)
    assert math.isfinite(fd) and fd > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b)


def test_fd_grows_with_stain_shift():
    enc = E.RandomConvEncoder(dim=32, seed=0)
    ref = enc.encode(he_tiles(96, seed=0))
    other = he_tiles(96, seed=1)  # same distribution, different tiles
    fds = [frechet_distance(ref, enc.encode(od_shift(other, s))) for s in (0.0, 0.15, 0.3, 0.6, 1.0)]
    assert all(b > a for a, b in zip(fds, fds[1:])), fds


def test_fidelity_report_per_group():
    enc = E.RandomConvEncoder(dim=16, seed=0)
    real = np.concatenate([he_tiles(40, seed=0), he_tiles(40, seed=1)])
    rgroups = [("LUAD", "s1")] * 40 + [("LUSC", "s2")] * 40
    synth = np.concatenate([he_tiles(40, seed=2), od_shift(he_tiles(40, seed=3), 0.8), he_tiles(3, seed=4)])
    sgroups = np.array([("LUAD", "s1")] * 40 + [("LUSC", "s2")] * 40 + [("LUAD", "s9")] * 3)
    rep = fidelity_report(enc(real), rgroups, enc(synth), sgroups, min_per_group=10)
    assert rep["n_real"] == 80 and rep["n_synth"] == 83 and rep["overall"] > 0
    g = rep["groups"]
    assert set(g) == {("LUAD", "s1"), ("LUSC", "s2")}
    assert g[("LUSC", "s2")]["fd"] > g[("LUAD", "s1")]["fd"]  # the stain-shifted subgroup is worse
    assert ("LUAD", "s9") in rep["skipped"] and "3 synthetic" in rep["skipped"][("LUAD", "s9")]
    assert rep["mean_group_fd"] == pytest.approx(np.mean([v["fd"] for v in g.values()]))
    assert fidelity_table(rep)["group"].tolist() == ["LUAD/s1", "LUSC/s2"]


def test_conditional_accuracy_seen_unseen():
    rng = np.random.default_rng(0)
    types, sites = ["A", "B"], ["s1", "s2", "s3", "s4"]

    def feats(t, s, n, site_signal=True):
        v = np.zeros((n, 6))
        v[:, types.index(t)] = 4
        if site_signal:
            v[:, 2 + sites.index(s)] = 4
        return v + rng.normal(0, 0.5, (n, 6))

    real_pairs = [("A", "s1"), ("A", "s2"), ("B", "s3"), ("B", "s4")]
    rf = np.concatenate([feats(t, s, 30) for t, s in real_pairs])
    rt = np.repeat([t for t, _ in real_pairs], 30)
    rs = np.repeat([s for _, s in real_pairs], 30)
    # Synthetic: seen pairs, plus an unseen pair (A, s3) whose generator ignored the site.
    sf = np.concatenate([feats("A", "s1", 20), feats("B", "s4", 20), feats("A", "s3", 20, site_signal=False)])
    st = np.repeat(["A", "B", "A"], 20)
    ss = np.repeat(["s1", "s4", "s3"], 20)
    out = conditional_accuracy(rf, rt, rs, sf, st, ss)
    assert (out["all"]["n"], out["seen"]["n"], out["unseen"]["n"]) == (60, 40, 20)
    assert out["seen"]["type_accuracy"] > 0.95 and out["seen"]["site_accuracy"] > 0.95
    assert out["seen"]["joint_accuracy"] > 0.9
    assert out["unseen"]["type_accuracy"] > 0.95 and out["unseen"]["site_accuracy"] < 0.2
    # Explicit flags win over the derived ones; an empty split reports NaN.
    flagged = conditional_accuracy(rf, rt, rs, sf, st, ss, seen=np.ones(60, bool))
    assert flagged["unseen"]["n"] == 0 and math.isnan(flagged["unseen"]["type_accuracy"])


# ---------------------------------------------------------------- encoders


def test_random_conv_encoder_deterministic_and_batch_independent():
    x = he_tiles(10, size=40)
    a = E.RandomConvEncoder(dim=24, seed=3)
    f = a.encode(x)
    assert f.shape == (10, 24) and f.dtype == np.float32
    np.testing.assert_array_equal(f, E.RandomConvEncoder(dim=24, seed=3).encode(x))
    assert not np.allclose(f, E.RandomConvEncoder(dim=24, seed=4).encode(x))
    # "real" and "synthetic" tiles go through one path: features do not depend on batch company.
    a.batch_size = 3
    np.testing.assert_allclose(a.encode(x[:4]), f[:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.encode(x[7]), f[7:8], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        a.encode(x.astype(np.float32) / 255)
    assert E.get_encoder("random-conv:8:1").encode(x).shape == (10, 8)


def test_missing_weights_fail_early(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        E.get_encoder(f"openclip:ViT-B-32:{missing}")
    with pytest.raises(FileNotFoundError, match="inception"):
        E.get_encoder("inception:")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        E.InceptionEncoder(missing)
    with pytest.raises(ValueError, match="openclip:<model_name>"):
        E.get_encoder("openclip:ViT-B-32")
    with pytest.raises(FileNotFoundError, match="uni:/models/uni.bin"):
        E.get_encoder("uni")
    with pytest.raises(ValueError, match="timm:<architecture>"):
        E.get_encoder("timm:vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unknown encoder"):
        E.get_encoder("virchow:/models/v.bin")


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def test_openclip_encoder_loads_local_weights(tmp_path):
    import open_clip

    cfg = tmp_path / "medi-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)  # registers "medi-tiny-clip" (file stem)
    torch.manual_seed(0)
    ref = open_clip.create_model("medi-tiny-clip").eval()
    weights = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), weights)

    enc = E.get_encoder(f"openclip:medi-tiny-clip:{weights}")
    x = he_tiles(5, size=48)  # resized to the tower's 32 px by the shared preprocess
    f = enc.encode(x)
    assert f.shape == (5, 16) and enc.dim == 16 and enc.size == 32
    with torch.no_grad():
        want = ref.visual(E.preprocess(x, 32, enc.mean, enc.std, "bicubic")).numpy()
    np.testing.assert_allclose(f, want, rtol=1e-4, atol=1e-5)  # the saved weights, not a random init
    torch.manual_seed(1)
    torch.save(open_clip.create_model("medi-tiny-clip").state_dict(), tmp_path / "other.pt")
    assert not np.allclose(E.OpenClipEncoder("medi-tiny-clip", tmp_path / "other.pt").encode(x), f)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        E.OpenClipEncoder("no-such-model", weights)


def test_inception_encoder_loads_local_state_dict(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    # A full torchvision checkpoint has the aux head too; the encoder must drop it.
    state = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    torch.save(state, tmp_path / "inc.pth")
    enc = E.get_encoder(f"inception:{tmp_path / 'inc.pth'}")
    f = enc.encode(he_tiles(2, size=32))
    assert f.shape == (2, 2048) and np.isfinite(f).all()


def test_inception_loads_pt_inception_style_checkpoints(tmp_path):
    """pytorch-fid's pt_inception has a 1008-class head and no BatchNorm counters; only pool3 is used."""
    from torchvision.models import inception_v3

    state = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception.pth")
    assert E.get_encoder(f"inception:{tmp_path / 'pt_inception.pth'}").encode(he_tiles(1, size=32)).shape == (1, 2048)
    with pytest.raises(ValueError, match=r"pt_inception.pth does not hold torchvision inception_v3 weights: 1 missing"):
        del state["Conv2d_1a_3x3.conv.weight"]
        torch.save(state, tmp_path / "pt_inception.pth")
        E.get_encoder(f"inception:{tmp_path / 'pt_inception.pth'}")


def test_timm_encoder_loads_local_weights_and_refuses_other_architectures(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "vit.pth")  # a training checkpoint, head included
    save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
    x = he_tiles(3, size=64)
    ref.reset_classifier(0)
    with torch.no_grad():
        want = ref(E.preprocess(x, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")).numpy()  # timm's config for this arch
    for name in ("vit.pth", "vit.safetensors"):
        enc = E.get_encoder(f"timm:vit_tiny_patch16_224:{tmp_path / name}")
        assert enc.dim == 192 and enc.size == 224
        np.testing.assert_allclose(enc.encode(x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown timm architecture"):
        E.get_encoder(f"timm:no_such_vit:{tmp_path / 'vit.pth'}")
    # UNI's preset is its published ViT-L/16 (303 M parameters); a file for another model is refused in one line.
    with pytest.raises(
        ValueError,
        match=r"vit.pth does not hold UNI \(MahmoodLab ViT-L/16\) weights: "
        r".* missing .* unexpected .* of another shape",
    ):
        E.get_encoder(f"uni:{tmp_path / 'vit.pth'}")
    arch, kwargs, _ = E.TIMM_PRESETS["uni"]
    with torch.device("meta"):
        uni = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    assert round(sum(p.numel() for p in uni.parameters()) / 1e6, 1) == 303.4 and uni.num_features == 1024
