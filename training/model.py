"""Autoencoders over standardised windows [batch, window, channels]: dense, conv1d, GRU, LSTM.

Every model maps a window to a code and back. The training variant decides what the code is
(plain, sigmoid for sparse or hashing, a Gaussian for the VAE) and which penalty the loss adds
(training/fit.py). In eval mode every model is deterministic, so it exports to ONNX without random
ops: the VAE uses the mean of its code, the hashing model a sigmoid without its training noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

ARCHITECTURES = ("dense", "conv1d", "gru", "lstm")
VARIANTS = ("basic", "denoising", "sparse", "contractive", "robust", "variational")
NOISES = ("none", "gaussian", "salt_pepper", "masking", "cauchy")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and training variant of an autoencoder; the defaults give a good first model."""

    channels: int
    # 32 samples: long enough to see the coupling between channels, short enough that a fault
    # dominates the window error within a few samples (detection delay).
    window: int = 32
    architecture: str = "dense"
    variant: str = "denoising"
    # Gaussian corruption at 0.2 standard deviations: enough to stop the identity mapping,
    # small against the faults we want to see.
    noise: str = "gaussian"
    noise_level: float = 0.2
    # A 16-unit code for 32x8 = 256 inputs: an 16x bottleneck forces the model to learn the
    # coupling between channels instead of copying them.
    code_size: int = 16
    hidden: int = 128
    hashing: bool = False
    # Std of the noise added before the hashing sigmoid: pushes codes towards 0/1.
    hash_noise: float = 1.0
    sparsity_target: float = 0.05
    sparsity_weight: float = 0.1
    contractive_weight: float = 1e-3
    correntropy_sigma: float = 1.0
    kl_weight: float = 1e-3

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {self.variant!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, not {self.noise!r}")
        if self.variant == "denoising" and self.noise == "none":
            raise ValueError("the denoising variant needs a noise kind (gaussian, salt_pepper, …)")
        if self.architecture == "conv1d" and self.window % 4:
            raise ValueError(f"conv1d needs a window divisible by 4, not {self.window}")
        if self.window < 2 or self.channels < 1 or self.code_size < 1:
            raise ValueError("window must be >= 2, channels and code_size >= 1")

    @property
    def sigmoid_code(self) -> bool:
        """Sparse (KL on mean activation) and hashing models need codes in (0, 1)."""
        return self.hashing or self.variant == "sparse"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Output(NamedTuple):
    reconstruction: torch.Tensor  # [B, W, C]
    code: torch.Tensor  # [B, K]: what `encode` returns (VAE: the mean; hashing: the sigmoid)
    mu: torch.Tensor | None  # VAE only
    logvar: torch.Tensor | None  # VAE only


class Autoencoder(nn.Module):
    """Encoder + bottleneck + decoder; `forward` returns reconstruction and code."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        pre_size = cfg.code_size * (2 if cfg.variant == "variational" else 1)
        self.encoder, self.decoder = _build(cfg, pre_size)

    def encode(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Code for standardised windows; in training mode the VAE samples and hashing is noisy."""
        pre = self.encoder(x)
        cfg = self.cfg
        if cfg.variant == "variational":
            mu, logvar = pre.chunk(2, dim=1)
            logvar = logvar.clamp(-10.0, 10.0)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
            return z, mu, logvar
        if cfg.hashing:
            if self.training:
                pre = pre + torch.randn_like(pre) * cfg.hash_noise
            return torch.sigmoid(pre), None, None
        if cfg.sigmoid_code:
            return torch.sigmoid(pre), None, None
        return pre, None, None

    def forward(self, x: torch.Tensor) -> Output:
        code, mu, logvar = self.encode(x)
        recon = self.decoder(code)
        # The VAE's exported code is its mean; elsewhere the code is what the decoder saw.
        return Output(recon, mu if mu is not None else code, mu, logvar)


class _Dense(nn.Module):
    def __init__(self, cfg: ModelConfig, pre_size: int, decode: bool) -> None:
        super().__init__()
        flat = cfg.window * cfg.channels
        h = cfg.hidden
        self.shape = (cfg.window, cfg.channels)
        self.decode = decode
        if decode:
            self.net = nn.Sequential(
                nn.Linear(cfg.code_size, h // 2),
                nn.ReLU(),
                nn.Linear(h // 2, h),
                nn.ReLU(),
                nn.Linear(h, flat),
            )
        else:
            self.net = nn.Sequential(
                nn.Linear(flat, h),
                nn.ReLU(),
                nn.Linear(h, h // 2),
                nn.ReLU(),
                nn.Linear(h // 2, pre_size),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode:
            return self.net(x).reshape(-1, *self.shape)
        return self.net(x.flatten(1))


class _ConvEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, pre_size: int) -> None:
        super().__init__()
        f = 32
        self.conv = nn.Sequential(
            nn.Conv1d(cfg.channels, f, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(f, 2 * f, 5, stride=2, padding=2),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * f * (cfg.window // 4), pre_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x.transpose(1, 2)).flatten(1))


class _ConvDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        f = 32
        self.steps = cfg.window // 4
        self.fc = nn.Linear(cfg.code_size, 2 * f * self.steps)
        self.deconv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose1d(2 * f, f, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(f, cfg.channels, 4, stride=2, padding=1),
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        h = self.fc(code).reshape(code.shape[0], -1, self.steps)
        return self.deconv(h).transpose(1, 2)


class _RecurrentEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, pre_size: int) -> None:
        super().__init__()
        rnn = nn.GRU if cfg.architecture == "gru" else nn.LSTM
        self.rnn = rnn(cfg.channels, cfg.hidden // 2, batch_first=True)
        self.fc = nn.Linear(cfg.hidden // 2, pre_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class _RecurrentDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        rnn = nn.GRU if cfg.architecture == "gru" else nn.LSTM
        self.window = cfg.window
        self.fc = nn.Linear(cfg.code_size, cfg.hidden // 2)
        self.rnn = rnn(cfg.hidden // 2, cfg.hidden // 2, batch_first=True)
        self.out = nn.Linear(cfg.hidden // 2, cfg.channels)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        # The code, repeated at every step, drives the decoder RNN.
        h = self.fc(code).unsqueeze(1).expand(-1, self.window, -1)
        out, _ = self.rnn(h)
        return self.out(out)


def _build(cfg: ModelConfig, pre_size: int) -> tuple[nn.Module, nn.Module]:
    if cfg.architecture == "dense":
        return _Dense(cfg, pre_size, decode=False), _Dense(cfg, pre_size, decode=True)
    if cfg.architecture == "conv1d":
        return _ConvEncoder(cfg, pre_size), _ConvDecoder(cfg)
    return _RecurrentEncoder(cfg, pre_size), _RecurrentDecoder(cfg)
