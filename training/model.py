"""Autoencoders over standardised windows [batch, window, channels]: dense, conv1d, GRU, LSTM.

Every model maps a window of its input channels to a code and back to the target channels
(all of them unless roles make some context only). The training variant decides what the code is
(plain, sigmoid for sparse or hashing, a Gaussian for the VAE) and which penalty the loss adds
(training/fit.py). In eval mode every model is deterministic, so it exports to ONNX without random
ops: the VAE uses the mean of its code, the hashing model a sigmoid without its training noise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from training.config import ARCHITECTURES, NOISES, VARIANTS, ModelConfig

__all__ = ["ARCHITECTURES", "NOISES", "VARIANTS", "Autoencoder", "ModelConfig", "Output"]


class Output(NamedTuple):
    reconstruction: torch.Tensor  # [B, W, T]: the target channels (all C without roles)
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
        hide = None
        if cfg.predict_steps:
            # 0 where the newest steps of the targets are hidden (their standardised mean).
            hide = torch.ones(cfg.window, cfg.channels)
            hide[-cfg.predict_steps :, list(cfg.targets)] = 0.0
        self.hide: torch.Tensor | None
        self.register_buffer("hide", hide)

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
        if self.hide is not None:
            x = x * self.hide
        code, mu, logvar = self.encode(x)
        recon = self.decoder(code)
        # The VAE's exported code is its mean; elsewhere the code is what the decoder saw.
        return Output(recon, mu if mu is not None else code, mu, logvar)


class _Dense(nn.Module):
    def __init__(self, cfg: ModelConfig, pre_size: int, decode: bool) -> None:
        super().__init__()
        flat = cfg.window * cfg.channels
        h = cfg.hidden
        self.shape = (cfg.window, cfg.outputs)
        self.decode = decode
        if decode:
            self.net = nn.Sequential(
                nn.Linear(cfg.code_size, h // 2),
                nn.ReLU(),
                nn.Linear(h // 2, h),
                nn.ReLU(),
                nn.Linear(h, cfg.window * cfg.outputs),
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
            nn.ConvTranspose1d(f, cfg.outputs, 4, stride=2, padding=1),
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
        self.out = nn.Linear(cfg.hidden // 2, cfg.outputs)

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
