"""The text `oteo inspect` prints: a model file's manifest described in a few lines.

`describe` makes the whole description; `detection_line` and `roles_line` are its two
summaries that need more than a format string (which stages move a stream's thresholds; which
channels are scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from daemon.manifest import Detection, Manifest


def describe(model_path: Path, sha256: str, m: Manifest) -> str:
    """The manifest of the file at `model_path` (whose digest is `sha256`), one fact a line."""
    cal, alarm = m.calibration, m.alarm
    lines = [
        f"{model_path}  sha256 {sha256}",
        f"name {m.name}  version {m.version}  created {m.created}",
        f"model {m.architecture} / {m.variant} (noise {m.noise} {m.noise_level:g}), "
        f"code {m.code_size}{' (hashable)' if m.hashable else ''}",
        f"window {m.window} samples x {len(m.channels)} channels, "
        f"sample period {m.sample_period_s:g} s",
        "channels " + ", ".join(m.channels),
        roles_line(m.channels, m.channel_roles()),
        f"thresholds enter {alarm.enter_threshold:.4g}  exit {alarm.exit_threshold:.4g}  "
        f"(rule {cal.rule}, q {cal.quantile}, {cal.windows} windows"
        f"{', cross-fitted' if cal.cross_fitted else ''})",
        f"alarm hop {alarm.hop}, {alarm.k} of {alarm.n} windows, clear after "
        f"{alarm.clear_windows}, cool-down {alarm.cooldown_windows}, "
        f"smoothing {alarm.smoothing_alpha:g}",
        detection_line(m.detection),
        f"false alarms/day on held-back data {cal.false_alarms_per_day:.2f} "
        f"over {cal.heldback_hours:.1f} h"
        + (
            f" (target {cal.target_false_alarms_per_day:g})"
            if cal.target_false_alarms_per_day is not None
            else ""
        ),
        f"trained on {m.provenance.rows} rows ({m.provenance.source}), "
        f"{m.provenance.epochs} epochs, seed {m.provenance.seed}, "
        f"{m.provenance.train_seconds:.1f} s",
        f"loss train {m.validation.train_loss:.4g}  held-back {m.validation.heldback_loss:.4g}  "
        f"parity {m.validation.parity_max_rel_error:.1e}",
    ]
    if m.validation.code_binariness is not None:
        lines.append(f"code binariness {m.validation.code_binariness:.1%}")
    if m.constant_channels:
        lines.append("near-constant channels " + ", ".join(m.constant_channels))
    lines += [f"warning: {w}" for w in cal.warnings]
    return "\n".join(lines)


def detection_line(d: Detection | None) -> str:
    """The stages that move a stream's thresholds, in one line."""
    parts = []
    if d is not None and d.baseline_samples:
        parts.append(f"dynamic threshold ({d.baseline_rule}) over {d.baseline_samples} samples")
    if d is not None and d.new_level_s:
        learnt = d.baseline_learns_accepted and d.baseline_samples and not d.baseline_in_alarm
        parts.append(f"new level {d.new_level_s:g} s{' (learnt when accepted)' if learnt else ''}")
    if d is not None and d.new_normal_s:
        parts.append(f"new normal after {d.new_normal_s:g} s")
    if d is not None and d.warmup_s:
        how = f"alarms above {d.warmup_factor:g} x the thresholds" if d.warmup_factor else "silent"
        parts.append(f"warm-up {d.warmup_s:g} s ({how})")
    return "detection " + ("; ".join(parts) if parts else "the calibrated thresholds only")


def roles_line(channels: Sequence[str], roles: Sequence[str]) -> str:
    """`roles target a, b; context c; ignore d` (long lists shortened)."""
    if all(r == "target" for r in roles):
        return "roles every channel is a target (scored)"
    parts = []
    for role in ("target", "context", "ignore"):
        names = [c for c, r in zip(channels, roles, strict=True) if r == role]
        if len(names) > 8:
            names = [*names[:6], "...", f"{names[-1]} ({len(names)})"]
        if names:
            parts.append(f"{role} " + ", ".join(names))
    return "roles " + "; ".join(parts)
