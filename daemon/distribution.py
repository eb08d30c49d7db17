"""Start-up check that `daemon` and `training` are this distribution's packages.

`python-daemon` on PyPI also imports as `daemon`; if it shadows ours, oteo would fail in
confusing ways, so refuse to start with a one-line explanation instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class DistributionError(RuntimeError):
    """Another distribution's package is imported under one of oteo's package names."""


def check_distribution() -> None:
    """Raise DistributionError if `daemon` or `training` resolve outside oteo."""
    here = Path(__file__).resolve().parent
    if not (here / "manifest.py").exists():
        raise DistributionError(
            f"the 'daemon' package at {here} is not oteo's (python-daemon installed?); "
            "uninstall python-daemon or use a separate virtual environment"
        )
    spec = importlib.util.find_spec("training")
    origin = Path(spec.origin).resolve().parent if spec and spec.origin else None
    if origin is not None and origin.parent != here.parent:
        raise DistributionError(
            f"the 'training' package at {origin} is not oteo's; use a clean virtual environment"
        )
