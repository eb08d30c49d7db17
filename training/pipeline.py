"""From a table of normal sensor data to one validated, self-describing ONNX file.

Steps: split off the time-ordered tail for calibration, standardise on the training rows, fit,
export, check parity torch vs onnxruntime, score the held-back windows with onnxruntime on the
exported graph (the runtime path), calibrate thresholds, write the manifest, reload the file
through the daemon's own loader. With too little held-back data the scores come from cross-fitted
models instead (each scores the fold it did not see; fold models are scored in torch, not
exported, since only the final model ships).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from daemon import __version__
from daemon.manifest import Manifest, Provenance, Validation, utc_now
from daemon.model import OUTPUTS, Model, session_options
from training import calibrate as cal
from training.config import ModelConfig, TrainOptions
from training.data import SensorTable, fingerprint, normal_segments, split_heldback, windows
from training.export import ScoringGraph, check_parity, to_onnx, with_manifest
from training.fit import FitResult, fit
from training.role import ChannelRoles, assign_roles

log = logging.getLogger(__name__)

# Fewer held-back windows than this and the thresholds come from cross-fitted scores.
MIN_HELDBACK_WINDOWS = 300
CROSS_FOLDS = 4


@dataclass
class TrainResult:
    path: Path
    manifest: Manifest
    fit: FitResult
    heldback_scores: np.ndarray
    # [N, C] the same windows' per-channel scores (calibration of the detection stages)
    heldback_channel_scores: np.ndarray
    heldback_newest: np.ndarray  # [N, C] squared standardised error of each newest sample
    sample_windows: np.ndarray  # a few held-back windows, raw units (for the report)
    sample_reconstructions: np.ndarray
    codes: np.ndarray
    seconds: float
    notes: list[str]


def standardisation(
    table: SensorTable,
    segments: list[tuple[int, int]],
    floor: float = 1e-3,
    roles: ChannelRoles | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and scale: the std, but at least `floor` x max(1, |mean|).

    Context channels are mapped onto [0, 1] by their range instead: a 0/1 command that is on 2 %
    of the time has a std of 0.14, and scaled by it every command would be a 7-sigma spike.
    """
    rows = np.concatenate([table.values[a:b] for a, b in segments]).astype(np.float64)
    mean = rows.mean(0)
    scale = np.maximum(rows.std(0), floor * np.maximum(1.0, np.abs(mean)))
    if roles is not None and (context := roles.context):
        low, high = rows[:, context].min(0), rows[:, context].max(0)
        mean[context] = low
        # A context channel constant in training: a change of its own size reads as 1.
        scale[context] = np.where(high > low, high - low, np.maximum(1.0, np.abs(low)))
    return mean.astype(np.float32), scale.astype(np.float32)


def ort_run(session: ort.InferenceSession, x: np.ndarray, batch: int = 2048) -> list[np.ndarray]:
    """All outputs for many windows, in batches of at least 2 (see daemon.model.Model.run)."""
    parts: list[list[np.ndarray]] = [[] for _ in OUTPUTS]
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        single = len(chunk) == 1
        if single:
            chunk = np.concatenate([chunk, chunk])
        for j, out in enumerate(session.run(list(OUTPUTS), {"window": chunk})):
            parts[j].append(out[:1] if single else out)
    return [np.concatenate(p) for p in parts]


@torch.no_grad()
def graph_scores(graph: ScoringGraph, x: np.ndarray, batch: int = 2048) -> cal.Series:
    """The scoring graph's errors in torch, for windows of models that are never exported."""
    graph.eval()
    outs = [graph(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]
    c = x.shape[-1]
    join = lambda k, empty: np.concatenate([o[k].numpy() for o in outs]) if outs else empty  # noqa: E731
    recon = join(2, np.empty((0, x.shape[1], c), np.float32))
    scale = graph.scale.numpy()
    score, channel = join(0, np.empty(0, np.float32)), join(1, np.empty((0, c), np.float32))
    return cal.Series(score, channel, newest_errors(x, recon, scale))


def newest_errors(x: np.ndarray, recon: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Squared standardised error of each window's newest sample [B, C] (raw-unit inputs)."""
    last = x[:, -1].astype(np.float64) - recon[:, -1].astype(np.float64)
    return (last / np.asarray(scale, dtype=np.float64)) ** 2


def _export_and_check(
    result: FitResult, mean: np.ndarray, scale: np.ndarray, roles: ChannelRoles, probe: np.ndarray
):
    graph = ScoringGraph(result.model, mean, scale, roles.roles).eval()
    proto = to_onnx(graph, result.model.cfg.window, len(roles.roles))
    session = ort.InferenceSession(proto.SerializeToString(), session_options(1))
    return proto, session, check_parity(graph, session, probe)


def _series_windows(table: SensorTable, segments, window: int, hop: int) -> list[np.ndarray]:
    """Held-back windows per contiguous segment, hop-spaced as the daemon scores them."""
    out = []
    for seg in segments:
        x, _ = windows(table, window, hop, segments=[seg])
        if len(x):
            out.append(x)
    return out


def train(table: SensorTable, opts: TrainOptions, out: Path) -> TrainResult:
    """Train, export, calibrate and write `out`; returns what the report needs."""
    t0 = time.perf_counter()
    notes = list(table.notes)
    normal = normal_segments(table)
    roles, role_notes = channel_roles(table, normal, opts)
    notes += role_notes
    cfg = replace(
        opts.model,
        channels=len(roles.inputs),
        target_positions=() if roles.every_channel_a_target else roles.target_positions,
    )
    train_segs, held_segs = split_heldback(table, opts.heldback_fraction)
    train_segs, held_segs = normal_segments(table, train_segs), normal_segments(table, held_segs)
    held_series = _series_windows(table, held_segs, cfg.window, opts.hop)
    n_held = sum(len(s) for s in held_series)
    cross = opts.cross_fit if opts.cross_fit is not None else n_held < MIN_HELDBACK_WINDOWS
    if not cross and n_held == 0:
        raise ValueError(
            f"the held-back last {opts.heldback_fraction:.0%} of the data holds no complete "
            f"window of {cfg.window} samples; record more data or use a shorter window"
        )
    if cross:
        train_segs = normal
    if not train_segs:
        raise ValueError("no normal rows to train on")
    mean, scale = standardisation(table, train_segs, opts.scale_floor, roles)
    notes += _constant_notes(table, roles, scale)
    z = _model_inputs(mean, scale, roles)
    x_train, _ = windows(table, cfg.window, 1, segments=train_segs)
    if len(x_train) < 2:
        raise ValueError(
            f"only {len(x_train)} training windows of {cfg.window} samples; need more data"
        )
    held_all = (
        np.concatenate(held_series)
        if held_series
        else np.empty((0, cfg.window, len(table.channels)), np.float32)
    )

    if cross:
        series, best_epochs = _cross_fit(table, normal, cfg, opts, mean, scale, roles)
        count = sum(len(s) for s in series)
        notes.append(f"cross-fitted thresholds over {CROSS_FOLDS} folds ({count} windows)")
        epochs = max(1, int(np.median(best_epochs)) + 1)
        result = fit(cfg, z(x_train), z(x_train[:0]), opts.fit, epochs=epochs)
    else:
        result = fit(cfg, z(x_train), z(held_all), opts.fit)
    probe = held_all[:64] if len(held_all) >= 64 else x_train[:64]
    proto, session, worst = _export_and_check(result, mean, scale, roles, probe)
    if cross:
        eval_windows = x_train[:: max(1, len(x_train) // 256)]
    else:
        outs = [(x, ort_run(session, x)) for x in held_series]
        series = [cal.Series(o[0], o[1], newest_errors(x, o[2], scale)) for x, o in outs]
        eval_windows = held_all
    _, _, recon, code = ort_run(session, eval_windows)
    # Calibration evidence: windows the scoring model never fitted (held back or out of fold).
    score = np.concatenate([s.score for s in series])
    channel_score = np.concatenate([s.channel for s in series])
    newest = np.concatenate([s.newest for s in series if s.newest is not None])

    targets = None if roles.every_channel_a_target else tuple(roles.targets)
    policy, detection, calibration = cal.calibrate_options(
        series, opts, table.period_s, cross, targets
    )
    for w in calibration.warnings:
        log.warning("%s", w)
    binariness = None
    if cfg.hashing:
        binariness = float(np.mean(np.abs(code - 0.5) > 0.4))
    manifest = Manifest(
        name=opts.name,
        version=opts.version,
        created=utc_now(),
        channels=list(table.channels),
        channel_mean=mean.tolist(),
        channel_scale=scale.tolist(),
        window=cfg.window,
        sample_period_s=table.period_s,
        architecture=cfg.architecture,  # type: ignore[arg-type]
        variant=cfg.variant,  # type: ignore[arg-type]
        noise=cfg.noise,  # type: ignore[arg-type]
        noise_level=cfg.noise_level if cfg.noise != "none" else 0.0,
        code_size=cfg.code_size,
        hashable=cfg.hashing,
        code_median=np.median(code, axis=0).astype(float).tolist(),
        residual_spread=residual_spread(eval_windows, recon, scale),
        calibration=calibration,
        alarm=policy,
        detection=detection,
        score_quantiles=cal.quantile_table(score),
        channel_score_quantiles=cal.channel_quantile_table(channel_score),
        constant_channels=list(table.constant_channels),
        roles=list(roles.roles),
        provenance=Provenance(
            data_fingerprint=fingerprint(table),
            source=table.source,
            rows=sum(b - a for a, b in table.segments),
            train_windows=len(x_train),
            seed=opts.fit.seed,
            epochs=result.epochs,
            train_seconds=round(result.seconds, 3),
            oteo_version=__version__,
            torch_version=torch.__version__,
        ),
        validation=Validation(
            train_loss=result.train_loss,
            heldback_loss=result.heldback_loss,
            parity_max_rel_error=worst,
            code_binariness=binariness,
        ),
    )
    data = with_manifest(proto, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    Model.from_bytes(data, out)  # the daemon's own checks, before the file is visible
    tmp.replace(out)
    log.info("wrote %s (sha256 %s)", out, hashlib.sha256(data).hexdigest())
    pick = np.linspace(0, len(eval_windows) - 1, num=min(4, len(eval_windows))).astype(int)
    return TrainResult(
        path=out,
        manifest=manifest,
        fit=result,
        heldback_scores=score,
        heldback_channel_scores=channel_score,
        heldback_newest=newest,
        sample_windows=eval_windows[pick],
        sample_reconstructions=recon[pick],
        codes=code,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


def channel_roles(
    table: SensorTable, normal: list[tuple[int, int]], opts: TrainOptions
) -> tuple[ChannelRoles, list[str]]:
    """Each channel's role (training/role.py) from the options and the normal rows."""
    rows = np.concatenate([table.values[a:b] for a, b in normal]) if normal else table.values[:0]
    return assign_roles(
        table.channels,
        rows,
        targets=opts.targets,
        context=opts.context,
        ignore=opts.ignore,
        discrete_role=opts.discrete_role,
    )


def _model_inputs(mean: np.ndarray, scale: np.ndarray, roles: ChannelRoles):
    """Raw windows [N, W, C] -> the model's standardised inputs [N, W, targets + context]."""
    if roles.every_channel_a_target:
        return lambda x: (x - mean) / scale
    inputs = roles.inputs
    return lambda x: ((x - mean) / scale)[..., inputs]


def residual_spread(windows: np.ndarray, recon: np.ndarray, scale: np.ndarray) -> list[float]:
    """Per channel, the std of the window-mean residual in standardised units (floored)."""
    mean_residual = (windows - recon).mean(axis=1) / scale
    spread = mean_residual.std(axis=0) if len(windows) > 1 else np.ones(windows.shape[2])
    return np.maximum(spread, 1e-6).astype(float).tolist()


def _constant_notes(table: SensorTable, roles: ChannelRoles, scale: np.ndarray) -> list[str]:
    """What happens to channels that were constant in training (by role)."""
    index = {c: i for i, c in enumerate(table.channels)}
    constant = [c for c in table.constant_channels if roles.roles[index[c]] == "target"]
    if not constant:
        return []
    floors = ", ".join(f"{c} {scale[index[c]]:.3g}" for c in constant[:8])
    return [
        f"constant in training and scored: {floors}{', ...' if len(constant) > 8 else ''} "
        "(scale floored: any change reads as anomalous; --context or --ignore if not wanted)"
    ]


def _cross_fit(table, normal, cfg: ModelConfig, opts: TrainOptions, mean, scale, roles):
    """Out-of-fold window scores from CROSS_FOLDS contiguous folds, and each fold's best epoch."""
    rows = np.concatenate([np.arange(a, b) for a, b in normal])
    bounds = np.linspace(0, len(rows), CROSS_FOLDS + 1).astype(int)
    series, best = [], []
    for k in range(CROSS_FOLDS):
        lo, hi = rows[bounds[k]], rows[bounds[k + 1] - 1] + 1
        held = [(max(a, lo), min(b, hi)) for a, b in normal if min(b, hi) > max(a, lo)]
        rest = [(a, min(b, lo)) for a, b in normal if min(b, lo) > a] + [
            (max(a, hi), b) for a, b in normal if b > max(a, hi)
        ]
        x_rest, _ = windows(table, cfg.window, 1, segments=rest)
        held_series = _series_windows(table, held, cfg.window, opts.hop)
        if len(x_rest) < 2 or not held_series:
            continue
        x_held = np.concatenate(held_series)
        fold_fit = replace(opts.fit, seed=opts.fit.seed + k + 1, progress=False)
        z = _model_inputs(mean, scale, roles)
        result = fit(cfg, z(x_rest), z(x_held), fold_fit)
        # Fold models are never shipped: their scores come from the same scoring graph in torch
        # (the final model's export proves that graph matches onnxruntime to PARITY_RTOL), which
        # saves one ONNX export per fold, most of the time of a small-data training run.
        graph = ScoringGraph(result.model, mean, scale, roles.roles).eval()
        series.extend(graph_scores(graph, s) for s in held_series)
        best.append(result.best_epoch)
    if not series:
        raise ValueError("too little normal data to cross-fit thresholds; record more rows")
    return series, best
