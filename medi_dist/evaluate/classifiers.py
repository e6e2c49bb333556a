"""The two downstream classifier families: a linear probe on frozen encoder features, and a small
CNN trained end to end on tiles (needs no pretrained weights). Both are class-balanced and seeded,
and both map arbitrary labels (ints or strings) back to the caller's values on predict.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from .encoders import check_tiles, preprocess


class LinearProbe:
    """Standardised features -> LogisticRegression(class_weight='balanced'), as in the MeDi reference.

    A single training class is allowed (it then always predicts that class) so that tiny
    leave-sites-out splits do not crash a sweep.
    """

    def __init__(
        self,
        C: float = 1.0,
        class_weight: str | None = "balanced",
        max_iter: int = 2000,
        standardize: bool = True,
        seed: int = 0,
    ):
        self.C, self.class_weight, self.max_iter = C, class_weight, max_iter
        self.standardize, self.seed = standardize, seed

    def fit(self, feats: np.ndarray, labels, sample_weight: np.ndarray | None = None) -> LinearProbe:
        labels = np.asarray(labels)
        self.classes_ = np.unique(labels)
        self._const = self.classes_[0] if len(self.classes_) == 1 else None
        if self._const is None:
            lr = LogisticRegression(
                C=self.C, class_weight=self.class_weight, max_iter=self.max_iter, random_state=self.seed
            )
            self.model_ = make_pipeline(StandardScaler(), lr) if self.standardize else lr
            kw = (
                {}
                if sample_weight is None
                else {("logisticregression__sample_weight" if self.standardize else "sample_weight"): sample_weight}
            )
            self.model_.fit(np.asarray(feats, dtype=np.float64), labels, **kw)
        return self

    def predict(self, feats: np.ndarray) -> np.ndarray:
        if self._const is not None:
            return np.full(len(feats), self._const, dtype=self.classes_.dtype)
        return self.model_.predict(np.asarray(feats, dtype=np.float64))

    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        if self._const is not None:
            return np.ones((len(feats), 1))
        return self.model_.predict_proba(np.asarray(feats, dtype=np.float64))


def _block(a: int, b: int) -> list[nn.Module]:
    return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]


class SmallCNN:
    """Tiny conv net trained from scratch on uint8 tiles (N, H, W, 3), resized to ``image_size``.

    Dihedral augmentation (flips + 90° rotations: tissue has no orientation), class-balanced cross
    entropy, AdamW with cosine decay. All randomness (init, shuffling, augmentation) comes from
    ``seed`` through private generators, so the same seed gives identical predictions on CPU
    (for a fixed torch thread count) and the caller's global RNG state is left alone.
    """

    def __init__(
        self,
        image_size: int = 32,
        width: int = 16,
        epochs: int = 8,
        batch_size: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        augment: bool = True,
        class_weight: str | None = "balanced",
        seed: int = 0,
        device: str = "cpu",
    ):
        self.image_size, self.width, self.epochs, self.batch_size = image_size, width, epochs, batch_size
        self.lr, self.weight_decay, self.augment, self.class_weight = lr, weight_decay, augment, class_weight
        self.seed, self.device = seed, torch.device(device)

    def _build(self, n_classes: int) -> nn.Module:
        w = self.width
        return nn.Sequential(
            *_block(3, w),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *_block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, n_classes),
        )

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        # Same fixed normalisation for every tile, real or synthetic.
        return preprocess(check_tiles(images), self.image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    @staticmethod
    def _dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = len(x)
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        k = torch.randint(0, 4, (n,), generator=g)
        out = x.clone()
        for r in (1, 2, 3):
            sel = k == r
            if sel.any():
                out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
        return out

    def fit(self, images: np.ndarray, labels, sample_weight: np.ndarray | None = None) -> SmallCNN:
        """`sample_weight`: each epoch draws its tiles with these probabilities (with replacement)."""
        labels = np.asarray(labels)
        self.classes_, y = np.unique(labels, return_inverse=True)
        x = self._tensor(images)
        y = torch.from_numpy(y.astype(np.int64))
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        k = len(self.classes_)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(self.seed)
            self.model_ = self._build(k).to(self.device)
        g = torch.Generator().manual_seed(self.seed + 1)
        weight = None
        if self.class_weight == "balanced":
            counts = torch.bincount(y, minlength=k).float()
            weight = (len(y) / (k * counts.clamp(min=1))).to(self.device)
        opt = torch.optim.AdamW(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.epochs * max(1, -(-len(x) // self.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.15)
        self.model_.train()
        for _ in range(self.epochs):
            order = (
                torch.randperm(len(x), generator=g)
                if sample_weight is None
                else torch.multinomial(torch.as_tensor(sample_weight, dtype=torch.float64), len(x), True, generator=g)
            )
            for i in range(0, len(x), self.batch_size):
                idx = order[i : i + self.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                    continue
                xb = self._dihedral(x[idx], g) if self.augment else x[idx]
                loss = F.cross_entropy(self.model_(xb.to(self.device)), y[idx].to(self.device), weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.model_.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        x = self._tensor(images)
        self.model_.eval()
        out = [
            F.softmax(self.model_(x[i : i + batch_size].to(self.device)), dim=1).cpu()
            for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes_)), np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(images).argmax(axis=1)]
