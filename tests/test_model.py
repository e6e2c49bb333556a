"""Model package: conditioned UNet, loss, EMA, model directory, sampling (CPU, tiny preset)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medi_dist.metadata import ConditioningSpec, ContinuousSpec, UnknownValueError, Vocab
from medi_dist.model import (
    EMA,
    ConditionedUNet,
    ModelConfig,
    ModelDirError,
    count_parameters,
    diffusion_loss,
    encode_conditions,
    load_model_dir,
    read_model_info,
    sample,
    save_model_dir,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def spec() -> ConditioningSpec:
    return ConditioningSpec(
        [
            Vocab("cancer_type", ["BRCA", "LUAD", "LUSC"]),
            Vocab("tissue_source_site", ["05", "44", "A2", "E2"]),
            Vocab("sex", ["female", "male", "Unknown"]),
        ],
        [ContinuousSpec("age", 60.0, 10.0)],
    )


ROWS = [
    {"cancer_type": "LUAD", "tissue_source_site": "05", "sex": "male", "age": 71},
    {"cancer_type": "LUSC", "tissue_source_site": "44", "sex": "female", "age": 55},
    {"cancer_type": "BRCA", "tissue_source_site": "A2"},  # partial: no sex, no age
    {"cancer_type": "LUAD", "tissue_source_site": "E2", "sex": "Unknown", "age": None},
]


def tiny(spec, **kw) -> ConditionedUNet:
    torch.manual_seed(0)
    return ConditionedUNet(ModelConfig.from_preset("tiny", **kw), spec)


def test_config_roundtrip_and_presets():
    cfg = ModelConfig.from_preset("small", fusion="concat", cond_dropout={"sex": 0.3})
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.dropout_for("sex") == 0.3 and again.dropout_for("cancer_type") == 0.1
    assert cfg.down_block_types == ("DownBlock2D",) * 4
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig.from_preset("tiny", fusion="film")


@pytest.mark.parametrize("fusion", ["additive", "concat", "linear"])
def test_fusion_forward_shapes(spec, fusion):
    m = tiny(spec, fusion=fusion)
    cond = encode_conditions(spec, ROWS)
    emb = m.cond_encoder(cond, 4, torch.device("cpu"))
    assert emb.shape == (4, m.config.time_embed_dim)
    if fusion == "concat":  # widths split the embedding; remainder goes to the first column
        widths = [e.embedding_dim for e in m.cond_encoder.cat] + [e.proj.out_features for e in m.cond_encoder.cont]
        assert sum(widths) == m.config.time_embed_dim and widths[0] >= widths[1]
    out = m(torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999]), cond)
    assert out.shape == (4, 3, 16, 16) and torch.isfinite(out).all()


def test_late_columns_reach_only_the_fine_blocks(spec, tmp_path):
    """A late column (the site) conditions only the last up blocks: the coarse levels, which lay out
    morphology, cannot read it; with its embedding zeroed the model is the plain UNet2DModel."""
    plain = tiny(spec).eval()
    late = tiny(spec, late_columns=["tissue_source_site"]).eval()
    late.load_state_dict(plain.state_dict())  # same parameters: the path differs, not the weights
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([5, 300, 600, 900])
    cond = encode_conditions(spec, ROWS)
    other_site = {**cond, "cond_tissue_source_site": cond["cond_tissue_source_site"].roll(1)}
    seen = []
    hook = late.unet.mid_block.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        a, b = late(x, t, cond), late(x, t, other_site)
    hook.remove()
    assert torch.equal(seen[0], seen[1]) and not torch.equal(a, b)  # the site reaches the output, not the mid block
    with torch.no_grad():
        for m in (plain, late):
            m.cond_encoder.cat[1].weight.zero_()
        assert torch.allclose(plain(x, t, cond), late(x, t, cond), atol=1e-5)
    # saved and loaded with its model directory
    save_model_dir(tmp_path / "m", late)
    again, cfg, _ = load_model_dir(tmp_path / "m", weights="raw")
    assert cfg.late_columns == ("tissue_source_site",)
    with torch.no_grad():
        assert torch.equal(again(x, t, cond), late(x, t, cond))
    with pytest.raises(ValueError, match="not condition columns"):
        tiny(spec, late_columns=["site"])
    with pytest.raises(ValueError, match="additive"):
        ModelConfig.from_preset("tiny", fusion="concat", late_columns=["tissue_source_site"])


def test_null_tokens(spec):
    m = tiny(spec).eval()
    enc = lambda c: m.cond_encoder(c, 2, torch.device("cpu"))  # noqa: E731
    full = encode_conditions(spec, ROWS[:2])
    # -1, a missing column and the explicit null conditions all mean the same null token
    minus = {**full, "cond_sex": torch.tensor([-1, -1])}
    missing = {k: v for k, v in full.items() if k != "cond_sex"}
    assert torch.equal(enc(minus), enc(missing))
    nan_age = {**full, "cont_age": torch.tensor([math.nan, math.nan])}
    no_age = {k: v for k, v in full.items() if k != "cont_age"}
    assert torch.equal(enc(nan_age), enc(no_age))
    assert not torch.equal(enc(full), enc(missing))
    assert torch.equal(enc({}), enc(m.null_conditions(2)))
    # NaN ages must not poison gradients
    m.train()
    diffusion_loss(m, torch.rand(2, 3, 16, 16) * 2 - 1, nan_age).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_drop_conditions_rate(spec):
    m = tiny(spec, cond_dropout={"cancer_type": 0.5, "sex": 0.0})
    n = 20000
    cond = {
        "cond_cancer_type": torch.ones(n, dtype=torch.long),
        "cond_sex": torch.zeros(n, dtype=torch.long),
        "cond_tissue_source_site": torch.full((n,), 2),
        "cont_age": torch.zeros(n),
    }
    out = m.drop_conditions(cond, torch.Generator().manual_seed(0))
    assert abs((out["cond_cancer_type"] == -1).float().mean().item() - 0.5) < 0.03
    assert abs((out["cond_tissue_source_site"] == -1).float().mean().item() - 0.1) < 0.02  # default rate
    assert abs(torch.isnan(out["cont_age"]).float().mean().item() - 0.1) < 0.02
    assert (out["cond_sex"] == 0).all()
    assert (cond["cond_cancer_type"] == 1).all()  # input untouched
    # columns are dropped independently
    both = ((out["cond_cancer_type"] == -1) & (out["cond_tissue_source_site"] == -1)).float().mean().item()
    assert abs(both - 0.05) < 0.015


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_decreases(spec, prediction_type):
    m = tiny(spec, prediction_type=prediction_type)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    x0 = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = encode_conditions(spec, ROWS * 2)
    losses = []
    for _ in range(30):
        # same generator seed each step: same t, noise and dropout -> a fixed problem to fit
        loss = diffusion_loss(m, x0, cond, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_sample_by_its_timestep(spec, prediction_type):
    """Min-SNR: each sample's squared error times min(SNR, 5) / SNR (ε) or / (SNR + 1) (v), replayed
    from the same generator (eval mode: no condition dropout draws before t and noise)."""
    from medi_dist.model import noise_scheduler

    m = tiny(spec, prediction_type=prediction_type).eval()
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = encode_conditions(spec, ROWS)
    got = diffusion_loss(m, x0, cond, torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(3)
    sched = noise_scheduler(m.config)
    t = torch.randint(0, sched.config.num_train_timesteps, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    xt = sched.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    with torch.no_grad():
        err = (m(xt, t, cond) - target).pow(2).mean(dim=(1, 2, 3))
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    weight = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    assert torch.allclose(got, (weight * err).mean(), rtol=1e-5)
    assert not torch.allclose(got, err.mean(), rtol=1e-2)  # the weights are not all 1
    unweighted = diffusion_loss(m, x0, cond, torch.Generator().manual_seed(3))
    assert torch.allclose(unweighted, err.mean(), rtol=1e-5)


def test_ema_warmup_and_state(spec):
    m = tiny(spec)
    ema = EMA(m, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): warm-up
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)
    k = "unet.conv_in.bias"
    assert torch.allclose(ema.shadow[k], dict(m.named_parameters())[k] - 0.1, atol=1e-6)
    other = EMA(tiny(spec))
    other.load_state_dict(ema.state_dict())
    assert other.step == 1 and torch.equal(other.shadow[k], ema.shadow[k])


def _trained(spec):
    m = tiny(spec, fusion="linear")
    ema = EMA(m, decay=0.9)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    cond = encode_conditions(spec, ROWS)
    for i in range(3):
        loss = diffusion_loss(m, torch.rand(4, 3, 16, 16) * 2 - 1, cond, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(m)
    return m.eval(), ema, cond


def test_model_dir_roundtrip(spec, tmp_path):
    m, ema, cond = _trained(spec)
    d = tmp_path / "model"
    model_id = save_model_dir(d, m, ema, extra_info={"steps": 3, "name": "unit test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs left behind
    assert {p.name for p in d.iterdir()} == {
        "model.safetensors",
        "ema.safetensors",
        "config.json",
        "conditioning.json",
        "checksums.json",
    }
    info = read_model_info(d)
    assert info["model_id"] == model_id and model_id.startswith("unit-test-") and info["info"]["steps"] == 3
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 200, 400, 900])
    with torch.no_grad():
        want_raw = m(x, t, cond)
        ema.copy_to(m)
        want_ema = m(x, t, cond)
    for weights, want in (("raw", want_raw), ("ema", want_ema), ("auto", want_ema)):
        # from the directory alone: no config, spec or training state passed in
        got_m, cfg, got_spec = load_model_dir(d, weights=weights)
        assert cfg == m.config and got_spec.to_dict() == spec.to_dict() and got_m.model_id == model_id
        with torch.no_grad():
            assert torch.equal(got_m(x, t, cond), want)
    assert not torch.equal(want_raw, want_ema)
    # saving again over the directory replaces it atomically; no EMA -> "auto" loads raw, "ema" refuses
    save_model_dir(d, m)
    assert load_model_dir(d)[0].weights_kind == "raw"
    with pytest.raises(ModelDirError, match="no ema weights"):
        load_model_dir(d, weights="ema")


def test_corrupted_weights_refused(spec, tmp_path):
    m, ema, _ = _trained(spec)
    d = tmp_path / "model"
    save_model_dir(d, m, ema)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"checksum mismatch for .*model\.safetensors"):
        load_model_dir(d, weights="raw")
    load_model_dir(d, weights="ema")  # the untouched file still loads
    (d / "ema.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"not a complete model directory \(ema\.safetensors missing\)"):
        load_model_dir(d, weights="ema")


def test_encode_conditions(spec):
    cond = encode_conditions(spec, ROWS)
    assert cond["cond_cancer_type"].tolist() == [1, 2, 0, 1]
    assert cond["cond_sex"].tolist() == [1, 0, -1, 2]  # absent -> null (-1); "Unknown" -> its token
    assert cond["cont_age"][0].item() == pytest.approx(1.1) and math.isnan(cond["cont_age"][2].item())
    with pytest.raises(UnknownValueError, match=r"unknown cancer_type 'KIRC'.*BRCA, LUAD, LUSC"):
        encode_conditions(spec, [{"cancer_type": "KIRC"}])
    with pytest.raises(UnknownValueError, match="not condition columns"):
        encode_conditions(spec, [{"cancer_type": "LUAD", "site": "05"}], strict=True)


@pytest.mark.parametrize("sampler,guidance", [("ddim", 1.0), ("dpmsolver++", 2.0), ("ddpm", 1.5)])
def test_sampling_reproducible_across_batches(spec, sampler, guidance):
    m = tiny(spec).eval()
    cond = encode_conditions(spec, ROWS[:3])
    seeds = [11, 22, 33]
    one = lambda i, **kw: sample(m, {k: v[i : i + 1] for k, v in cond.items()}, seeds=[seeds[i]], **kw)[0]  # noqa: E731
    # per_tile=True: bitwise identical tiles whether batched, alone, or in another order
    kw = dict(sampler=sampler, steps=4, guidance_scale=guidance, per_tile=True)
    batched = sample(m, cond, seeds=seeds, **kw)
    assert batched.shape == (3, 16, 16, 3) and batched.dtype == np.uint8
    np.testing.assert_array_equal(batched, np.stack([one(i, **kw) for i in range(3)]))
    rev = sample(m, {k: v.flip(0) for k, v in cond.items()}, seeds=seeds[::-1], **kw)
    np.testing.assert_array_equal(batched, rev[::-1])
    # default (fully batched): same noise per tile; batched kernels may move a rare pixel by one level
    kw["per_tile"] = False
    fast = sample(m, cond, seeds=seeds, **kw)
    alone = np.stack([one(i, **kw) for i in range(3)])
    for a in (batched, alone):
        diff = np.abs(fast.astype(int) - a.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.array_equal(fast, sample(m, cond, seeds=seeds, **kw))  # same batch -> bitwise identical
    other_seed = sample(m, {k: v[:1] for k, v in cond.items()}, seeds=[12], **kw)[0]
    assert np.abs(one(0, **kw).astype(int) - other_seed).max() > 8


def test_guidance_interval_guides_only_the_steps_it_covers(spec):
    m = tiny(spec).eval()
    cond = encode_conditions(spec, ROWS[:3])
    rows = []
    m.register_forward_pre_hook(lambda _m, args: rows.append(len(args[0])))  # rows per denoiser call
    run = lambda **kw: sample(m, cond, seeds=[1, 2, 3], sampler="dpmsolver++", steps=4, return_tensor=True, **kw)  # noqa: E731
    plain, full = run(), run(guidance_scale=2.0)
    rows.clear()
    # DPM-Solver++ at 4 steps visits t = 999, 749, 499, 249 (of 1000): (0.45, 1) covers the first three
    half = run(guidance_scale=2.0, guidance_interval=(0.45, 1.0))
    assert rows == [6, 6, 6, 3]  # [cond; uncond] where guided, cond alone after: the cost is the interval's
    assert torch.equal(run(guidance_scale=2.0, guidance_interval=(0.0, 1.0)), full)
    assert torch.equal(run(guidance_scale=2.0, guidance_interval=(0.0, 0.2)), plain)  # covers no step: unguided
    assert (half - plain).abs().max() > 1e-3 and (half - full).abs().max() > 1e-3


def test_reference_deep_parameter_count(spec):
    with torch.device("meta"):  # no memory, no init cost
        m = ConditionedUNet(ModelConfig.from_preset("reference-deep"), spec)
    n = count_parameters(m)
    assert 380e6 <= n <= 450e6, n
    assert m.config.sample_size == 128 and set(m.config.down_block_types) == {"DownBlock2D"}
    del m
