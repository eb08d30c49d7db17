"""Input corruption for denoising autoencoders, in standardised units.

| kind        | what a corrupted value is                                                   |
|-------------|-----------------------------------------------------------------------------|
| gaussian    | x + N(0, level)                                                             |
| salt_pepper | with probability `level`, the channel's observed min or max (50/50)         |
| masking     | with probability `level`, 0, i.e. the channel mean                          |
| cauchy      | x + level * Cauchy(0, 1), clipped to +-10 (heavy-tailed, like real glitches)|

Salt-and-pepper uses each channel's observed range rather than a literal 0/1: after
standardisation 0 is the mean, not a low value, and 1 is an ordinary reading.
"""

from __future__ import annotations

import torch


class Corruption:
    """Corrupts a batch of standardised windows [B, W, C]; the target stays the clean batch."""

    def __init__(self, kind: str, level: float, low: torch.Tensor, high: torch.Tensor) -> None:
        self.kind = kind
        self.level = level
        self.low = low  # [C] observed per-channel minimum, standardised
        self.high = high  # [C] observed per-channel maximum, standardised

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.kind == "none" or self.level <= 0:
            return x
        if self.kind == "gaussian":
            return x + torch.randn(x.shape, generator=gen) * self.level
        if self.kind == "cauchy":
            u = torch.rand(x.shape, generator=gen)
            return x + (self.level * torch.tan(torch.pi * (u - 0.5))).clamp(-10.0, 10.0)
        hit = torch.rand(x.shape, generator=gen) < self.level
        if self.kind == "masking":
            return x.masked_fill(hit, 0.0)
        if self.kind == "salt_pepper":
            salt = torch.rand(x.shape, generator=gen) < 0.5
            extreme = torch.where(salt, self.high.expand_as(x), self.low.expand_as(x))
            return torch.where(hit, extreme, x)
        raise ValueError(f"unknown noise kind {self.kind!r}")
