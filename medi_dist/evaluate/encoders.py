"""Frozen feature extractors: uint8 tiles (N, H, W, 3) -> float32 features (N, D).

Real and synthetic tiles go through the *same* ``encode`` call, hence the same resize and
normalisation (the MeDi reference preprocessed them differently, which alone moves Fréchet distances
and probe accuracies). Weights only ever come from a local file; nothing is downloaded.

Specs for ``get_encoder``: ``random-conv[:DIM[:SEED]]``, ``uni:<path>`` (UNI ViT-L/16, the MeDi
reference's encoder), ``uni2-h:<path>``, ``timm:<architecture>:<path>`` (any timm image model, e.g.
Virchow or H-optimus exports), ``openclip:<model_name>:<path>``, ``inception:<path>``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_device(device: str | torch.device) -> torch.device:
    """A --device this machine has, checked up front (torch would fail later with a RuntimeError)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(
                f"--device {device}: CUDA is not available on this machine (no GPU visible to "
                f"torch {torch.__version__}); use --device cpu"
            )
        if d.index is not None and d.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return d


def check_tiles(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3 and images.shape[-1] == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        # Refuse floats instead of guessing their scale: a silent [0,1] vs [0,255] mix-up between
        # real and synthetic tiles is exactly the preprocessing defect we must not repeat.
        raise ValueError(f"encoders take uint8 RGB tiles shaped (N, H, W, 3); got {images.dtype} {images.shape}")
    return images


def preprocess(images: np.ndarray, size: int, mean, std, mode: str = "bilinear") -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW at size x size (antialiased resize when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False).clamp_(0, 1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _refused(path: Path, e: Exception) -> ValueError:
    """One line for a file that is not plain tensors. PyTorch's own text advises weights_only=False,
    which this project never does with a user's file, so only the cause is kept."""
    text = str(e)
    m = re.search(r"Unsupported (?:global: GLOBAL [\w.]+|operand \d+)", text)
    if m:
        cause = m.group(0)
    elif "weights_only" in text:
        cause = type(e).__name__
    else:
        cause = f"{type(e).__name__}: {' '.join(text.split())[:160]}"
    return ValueError(
        f"{path} is not a plain tensor state dict/safetensors file (refused without unpickling: "
        f"{cause}); export the weights with torch.save(model.state_dict()) or as .safetensors"
    )


def _load_state(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file; torch files load with weights_only (no unpickling).
    mmap: map the tensors instead of reading them (a format check before another loader reads the file)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            if mmap:
                with safe_open(str(path), "pt") as f:  # header only
                    return dict.fromkeys(f.keys())
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except OSError:
        raise
    except Exception as e:  # garbage, a pickle of anything but tensors, a truncated file
        raise _refused(path, e) from None
    for key in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _load_weights(model: nn.Module, state: dict, path: Path, what: str) -> None:
    """Strict load; a file for another architecture gets one message instead of a key dump."""
    own = model.state_dict()
    state = dict(state)
    for k in set(own) - set(state):  # BatchNorm counters: absent from older checkpoints, unused in eval
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros(own[k].shape, dtype=own[k].dtype)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:

        def some(keys):
            return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")

        raise ValueError(
            f"{path} does not hold {what} weights: {len(missing)} missing ({some(missing)}), "
            f"{len(unexpected)} unexpected ({some(unexpected)}), {len(shapes)} of another shape "
            f"({some(shapes)}); check the file and the encoder spec"
        )
    model.load_state_dict(state, assign=True)


def _mismatch(text: str) -> str:
    """Counts from torch's load_state_dict error (which lists every key)."""

    def keys(part: str) -> int:
        m = re.search(rf"{part} key\(s\) in state_dict:(.*?)(?:\n\t|$)", text, re.S)
        return len(re.findall(r'"[^"]+"', m.group(1))) if m else 0

    return (
        f"{keys('Missing')} missing, {keys('Unexpected')} unexpected, "
        f"{text.count('size mismatch for')} of another shape"
    )


def _need_file(path: str | Path | None, what: str, hint: str) -> Path:
    if not path:
        raise FileNotFoundError(f"{what} needs a local weights file; {hint}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {str(p)!r}; {hint}")
    return p.resolve()  # absolute, so open_clip can never mistake it for a download tag


class Encoder:
    """Base: subclasses set ``model``, ``size``, ``mean``, ``std``, ``dim`` and ``name``."""

    model: nn.Module
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int
    name: str
    interpolation = "bilinear"

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        self.device = check_device(device)
        self.batch_size = batch_size

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        images = check_tiles(images)
        self.model.eval()
        out = []
        for i in range(0, len(images), self.batch_size):
            x = preprocess(images[i : i + self.batch_size], self.size, self.mean, self.std, self.interpolation)
            out.append(self._forward(x.to(self.device)).float().flatten(1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    __call__ = encode

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dim={self.dim})"


class RandomConvEncoder(Encoder):
    """Fixed random-weight CNN with global pooling; needs no weights, deterministic per seed.

    Random conv features are a weak but honest stand-in for a pretrained encoder: they respond to
    colour, texture and scale, so Fréchet distances still rank stain shifts correctly in tests and
    on the procedural data.
    """

    def __init__(self, dim: int = 64, seed: int = 0, size: int = 64, device: str = "cpu", batch_size: int = 256):
        super().__init__(device, batch_size)
        self.dim, self.size, self.name = dim, size, f"random-conv:{dim}:{seed}"
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        layers, ch = [], [3, 16, 32, dim]
        for i, (a, b) in enumerate(zip(ch[:-1], ch[1:])):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]
            if i < len(ch) - 2:
                layers.append(nn.AvgPool2d(2))
        self.model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        g = torch.Generator().manual_seed(seed)  # own generator: global RNG state untouched
        with torch.no_grad():
            for m in self.model:
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / (m.weight[0].numel())) ** 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        self.model.to(self.device).eval()


class OpenClipEncoder(Encoder):
    """Image tower of an open_clip model, weights from a local checkpoint (e.g. a CONCH/UNI-style
    open_clip export). Features are the tower's embedding (before any normalisation)."""

    def __init__(self, model_name: str, weights_path: str | Path, device: str = "cpu", batch_size: int = 64):
        path = _need_file(
            weights_path,
            f"OpenClipEncoder({model_name!r})",
            "pass the path of a downloaded open_clip checkpoint (.bin/.pt/.safetensors), "
            "e.g. --encoder openclip:ViT-B-16:/models/vit_b16.safetensors",
        )
        super().__init__(device, batch_size)
        import open_clip  # imported lazily: heavy, and only this encoder needs it

        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}; known: {', '.join(open_clip.list_models())}")
        _load_state(path, mmap=True)  # open_clip's own load error advises unpickling; check the format first
        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=self.device)
        except RuntimeError as e:  # a file for another architecture: one line, not a dump of every key
            if "Error(s) in loading state_dict" not in str(e):
                raise
            raise ValueError(
                f"{path} does not hold open_clip {model_name!r} weights: {_mismatch(str(e))}; "
                "check the file and the encoder spec"
            ) from None
        self.model = model.visual.eval()
        cfg = getattr(self.model, "preprocess_cfg", {})
        size = cfg.get("size", getattr(self.model, "image_size", 224))
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self.interpolation = "bicubic" if cfg.get("interpolation", "bicubic") == "bicubic" else "bilinear"
        self.name = f"openclip:{model_name}:{path}"
        with torch.no_grad():
            self.dim = int(self.model(torch.zeros(1, 3, self.size, self.size, device=self.device)).shape[-1])


class InceptionEncoder(Encoder):
    """torchvision Inception-v3 pool3 (2048-d) features from a local state dict.

    Note: torchvision's ImageNet weights are not the TF 'FID Inception' weights, so distances are
    comparable within this project but not with published FID numbers.
    """

    def __init__(self, weights_path: str | Path | None, device: str = "cpu", batch_size: int = 32):
        path = _need_file(
            weights_path,
            "InceptionEncoder",
            "pass a torchvision inception_v3 state dict (.pth/.safetensors), "
            "e.g. --encoder inception:/models/inception_v3_google-0cc3c7bd.pth",
        )
        super().__init__(device, batch_size)
        from torchvision.models import inception_v3

        # Heads are unused (output = 2048-d pool3 features), so any class count loads: torchvision's 1000
        # and pytorch-fid's pt_inception 1008 alike.
        state = {k: v for k, v in _load_state(path).items() if not k.startswith(("AuxLogits.", "fc."))}
        # transform_input=True: the ImageNet weights expect torchvision's re-scaling of normalised input.
        model = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
        model.fc = nn.Identity()
        _load_weights(model, state, path, "torchvision inception_v3")
        self.model = model.to(self.device).eval()
        self.size, self.dim, self.name = 299, 2048, f"inception:{path}"
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD


# Published pathology foundation models as timm architectures (from their model cards); weights from disk.
TIMM_PRESETS = {
    "uni": (
        "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
        "UNI (MahmoodLab ViT-L/16)",
    ),
    "uni2-h": (
        "vit_giant_patch14_224",
        dict(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            reg_tokens=8,
            dynamic_img_size=True,
            mlp_layer="SwiGLUPacked",
            act_layer="silu",
        ),
        "UNI2-h (MahmoodLab ViT-H/14)",
    ),
}


class TimmEncoder(Encoder):
    """A timm image model without its head (``num_classes=0``: pooled features), weights from a local
    file. Built on the meta device and filled from the file, so a ViT-L is never initialised twice.
    Presets use ImageNet normalisation at 224 px, as UNI's model card does; other architectures use
    timm's own preprocessing config."""

    def __init__(
        self, arch: str, weights_path: str | Path, device: str = "cpu", batch_size: int = 64, preset: str | None = None
    ):
        import timm

        kwargs, what = {}, f"timm {arch!r}"
        if preset:
            arch, kwargs, what = TIMM_PRESETS[preset]
            kwargs = dict(kwargs)
            if "mlp_layer" in kwargs:
                from timm.layers import SwiGLUPacked

                kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        example = f"{preset}:/models/{preset}.bin" if preset else f"timm:{arch}:/models/{arch}.safetensors"
        path = _need_file(weights_path, what, f"pass the local weights file, e.g. --encoder {example}")
        super().__init__(device, batch_size)
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm architecture {arch!r}; see timm.list_models(), e.g. vit_large_patch16_224")
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        state = {k: v for k, v in _load_state(path).items() if not k.startswith("head.")}  # head unused
        _load_weights(model, state, path, what)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # non-persistent buffers
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
            model.load_state_dict(state, strict=False)
        self.model = model.to(self.device).float().eval()  # fp16 exports too
        cfg = model.pretrained_cfg
        if preset:
            self.size, self.mean, self.std, self.interpolation = 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
        else:
            self.size = int(cfg.get("input_size", (3, 224, 224))[-1])
            self.mean, self.std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
            self.interpolation = "bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear"
        self.dim, self.name = int(model.num_features), f"{preset or 'timm:' + arch}:{path}"


def get_encoder(spec: str, device: str = "cpu") -> Encoder:
    """Build an encoder from a spec string (see the module docstring)."""
    check_device(device)  # before any weights file is read
    kind, _, rest = spec.partition(":")
    if kind == "random-conv":
        parts = [p for p in rest.split(":") if p]
        if len(parts) > 2 or not all(p.isdigit() for p in parts) or (parts and int(parts[0]) < 1):
            raise ValueError(
                f"encoder spec {spec!r}: expected random-conv[:DIM[:SEED]] with whole numbers, "
                "DIM >= 1 (e.g. random-conv:64:0)"
            )
        return RandomConvEncoder(
            dim=int(parts[0]) if parts else 64, seed=int(parts[1]) if len(parts) > 1 else 0, device=device
        )
    if kind == "openclip":
        name, _, path = rest.partition(":")
        if not name or not path:
            raise ValueError(f"encoder spec {spec!r}: expected openclip:<model_name>:<local weights path>")
        return OpenClipEncoder(name, path, device=device)
    if kind == "inception":
        return InceptionEncoder(rest or None, device=device)
    if kind in TIMM_PRESETS:
        return TimmEncoder("", rest or None, device=device, preset=kind)
    if kind == "timm":
        arch, _, path = rest.partition(":")
        if not arch or not path:
            raise ValueError(f"encoder spec {spec!r}: expected timm:<architecture>:<local weights path>")
        return TimmEncoder(arch, path, device=device)
    raise ValueError(
        f"unknown encoder spec {spec!r}; use random-conv[:DIM[:SEED]], uni:<path>, uni2-h:<path>, "
        "timm:<architecture>:<path>, openclip:<model_name>:<path> or inception:<path>"
    )
