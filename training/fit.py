"""The training loop: minibatches of normal windows, a variant-specific loss, early stopping.

Reproducible for a seed: one torch generator drives shuffling and corruption, and torch's global
RNG (used by the VAE and the hashing noise) is seeded from it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from training.config import FitConfig, ModelConfig
from training.model import Autoencoder, Output
from training.noise import Corruption


@dataclass
class FitResult:
    model: Autoencoder
    epochs: int
    best_epoch: int
    train_loss: float
    heldback_loss: float
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


def loss_terms(
    model: Autoencoder, out: Output, clean: torch.Tensor, noisy: torch.Tensor
) -> torch.Tensor:
    """Reconstruction loss of the variant plus its penalty, averaged over the batch."""
    cfg: ModelConfig = model.cfg
    err = out.reconstruction - targets_of(cfg, clean)
    if cfg.variant == "robust":
        # Correntropy: large errors (outliers in "normal" data) saturate instead of dominating.
        s2 = 2.0 * cfg.correntropy_sigma**2
        loss = (1.0 - torch.exp(-(err**2) / s2)).mean() * s2
    else:
        loss = (err**2).mean()
    if cfg.variant == "variational" and out.mu is not None and out.logvar is not None:
        kl = -0.5 * (1 + out.logvar - out.mu**2 - out.logvar.exp()).sum(1).mean()
        loss = loss + cfg.kl_weight * kl
    elif cfg.variant == "sparse":
        rho = cfg.sparsity_target
        rho_hat = out.code.mean(0).clamp(1e-6, 1 - 1e-6)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        loss = loss + cfg.sparsity_weight * kl.sum()
    elif cfg.variant == "contractive":
        loss = loss + cfg.contractive_weight * _jacobian_norm(out.code, noisy)
    return loss


def targets_of(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """The channels of standardised windows the model rebuilds (all, unless roles say less)."""
    return x[..., list(cfg.target_positions)] if cfg.target_positions else x


def _jacobian_norm(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Unbiased one-sample estimate of ||d code / d x||_F^2 per window (E_v ||v^T J||^2)."""
    v = torch.randn_like(code)
    (g,) = torch.autograd.grad((code * v).sum(), x, create_graph=True)
    return (g**2).flatten(1).sum(1).mean()


def fit(
    cfg: ModelConfig,
    train: np.ndarray,
    heldback: np.ndarray,
    fit_cfg: FitConfig,
    *,
    epochs: int | None = None,
) -> FitResult:
    """Train on standardised windows; early-stop on `heldback` unless `epochs` is fixed."""
    t0 = time.perf_counter()
    torch.set_num_threads(fit_cfg.threads)
    gen = torch.Generator().manual_seed(fit_cfg.seed)
    torch.manual_seed(fit_cfg.seed)
    model = Autoencoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=fit_cfg.lr, weight_decay=fit_cfg.weight_decay)
    x_train = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    x_val = torch.from_numpy(np.ascontiguousarray(heldback, dtype=np.float32))
    flat = x_train.reshape(-1, cfg.channels)
    corrupt = Corruption(cfg.noise, cfg.noise_level, flat.min(0).values, flat.max(0).values)

    n = len(x_train)
    batch = min(fit_cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    max_epochs = epochs if epochs is not None else fit_cfg.max_epochs
    max_epochs = max(1, min(max_epochs, math.ceil(fit_cfg.max_steps / steps_per_epoch)))
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    history: dict[str, list[float]] = {"train": [], "heldback": []}
    bar = tqdm(
        range(max_epochs), desc="train", unit="epoch", disable=not fit_cfg.progress, leave=False
    )
    stale = 0
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            clean = x_train[order[i * batch : (i + 1) * batch]]
            noisy = corrupt(clean, gen)
            if cfg.variant == "contractive":
                noisy = noisy.detach().requires_grad_(True)
            loss = loss_terms(model, model(noisy), clean, noisy)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        val = evaluate_loss(model, x_val) if len(x_val) else total / steps_per_epoch
        history["train"].append(total / steps_per_epoch)
        history["heldback"].append(val)
        bar.set_postfix(loss=f"{total / steps_per_epoch:.4f}", heldback=f"{val:.4f}")
        if val < best[0] * 0.999:
            best = (val, epoch, copy.deepcopy(model.state_dict()))
            stale = 0
        elif epochs is None:
            stale += 1
            if stale >= fit_cfg.patience:
                break
    if epochs is None:
        model.load_state_dict(best[2])
    model.eval()
    best_epoch = best[1] if epochs is None else len(history["train"]) - 1
    return FitResult(
        model=model,
        epochs=len(history["train"]),
        best_epoch=best_epoch,
        train_loss=history["train"][best_epoch],
        heldback_loss=history["heldback"][best_epoch],
        seconds=time.perf_counter() - t0,
        history=history,
    )


@torch.no_grad()
def evaluate_loss(model: Autoencoder, x: torch.Tensor, batch: int = 1024) -> float:
    """Mean squared reconstruction error of clean windows in eval mode."""
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        err = model(chunk).reconstruction - targets_of(model.cfg, chunk)
        total += float((err**2).mean()) * len(chunk)
    return total / max(1, len(x))
