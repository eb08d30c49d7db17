"""Pictures of a training run (`oteo train` report) and of an evaluation (`oteo evaluate` plot).

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot: nothing is
registered in a global figure list, so no backend has to be chosen, no window can open, and a
figure is freed as soon as it goes out of scope (no leak when many reports are written).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from daemon.manifest import AlarmPolicy
    from training.pipeline import TrainResult  # imports torch; the report itself needs none

DPI = 100
SCORE_LABEL = "score (mean squared error, standardised)"
ENTER_COLOUR, EXIT_COLOUR = "tab:red", "tab:orange"
# More points than this in the code scatter only blur into one blob and slow the drawing.
MAX_SCATTER = 5000
FIGURES = ("loss.png", "scores.png", "codes.png", "reconstructions.png")


def write_report(result: TrainResult, out_dir: Path) -> Path:
    """Write the figures and a self-contained index.html into `out_dir`; returns the page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(_loss_figure(result), out_dir / "loss.png")
    _save(_scores_figure(result), out_dir / "scores.png")
    _save(_codes_figure(result), out_dir / "codes.png")
    _save(_reconstruction_figure(result), out_dir / "reconstructions.png")
    page = out_dir / "index.html"
    page.write_text(_html(result), encoding="utf-8")
    return page


def plot_scores(
    path: Path,
    timestamps: np.ndarray,
    score: np.ndarray,
    alarm: np.ndarray,
    label: np.ndarray,
    policy: AlarmPolicy,
    trained_until: float | None = None,
) -> None:
    """Score vs UTC time with thresholds, labelled anomalies and alarms; fast for 10^6 points.

    `trained_until` (unix s) shades the rows the model was trained on (benchmarks)."""
    t = np.asarray(timestamps, dtype=np.float64)
    columns = np.column_stack([score, alarm, label]).astype(np.float64)
    if len(columns) != len(t):
        raise ValueError(f"{len(t)} timestamps but {len(columns)} scores, alarms or labels")
    if np.any(np.diff(t) < 0):
        order = np.argsort(t, kind="stable")
        t, columns = t[order], columns[order]
    fig = _figure(12, 4.5)
    ax = fig.add_subplot()
    if len(t) == 0:
        _empty(ax, "no samples")
        _save(fig, path)
        return
    left, right, peak = bucket_max(t, columns, buckets=int(12 * DPI))
    gap = left[1:] - right[:-1] > 0.5 * (right[:-1] - left[:-1])
    x0, x1 = _datenum(left), _datenum(right)
    per = len(t) / len(left)
    line_x = np.insert(x0, np.flatnonzero(gap) + 1, x1[:-1][gap])
    line_y = np.insert(peak[:, 0], np.flatnonzero(gap) + 1, np.nan)
    what = f"score (max per ~{per:.0f} samples)" if per > 1.5 else "score"
    ax.plot(line_x, line_y, color="tab:blue", lw=0.8, label=what)
    enter, exit_ = policy.enter_threshold, policy.exit_threshold
    ax.axhline(enter, color=ENTER_COLOUR, lw=1.2, label=f"enter threshold {enter:.4g}")
    ax.axhline(exit_, color=EXIT_COLOUR, lw=1.2, ls="--", label=f"exit threshold {exit_:.4g}")
    _spans(ax, x0, x1, peak[:, 2] > 0, gap, (0.0, 1.0), "tab:red", 0.15, "labelled anomaly")
    _spans(ax, x0, x1, peak[:, 1] > 0, gap, (0.0, 0.05), "tab:purple", 0.8, "alarm")
    if trained_until is not None:
        end = _datenum(np.array([trained_until]))[0]
        ax.axvspan(x0[0], end, color="grey", alpha=0.15, lw=0, label="training rows")
    ax.set_xlim(x0[0], x1[-1])
    finite = peak[:, 0][np.isfinite(peak[:, 0])]
    if _spans_decades(np.r_[finite, exit_]):
        ax.set_yscale("log")
    _date_axis(ax)
    ax.set(title=f"Anomaly score over time ({len(t):,} samples)", ylabel=SCORE_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", ncol=5, fontsize=8, framealpha=0.9)
    _save(fig, path)


def plot_anomaly_score(
    path: Path,
    score: np.ndarray,
    anomaly: np.ndarray,
    windows: list[tuple[int, int]],
    probation: int,
    thresholds: dict[str, float],
) -> None:
    """Detection score and anomaly score per row, with thresholds, labelled windows and the
    probationary period (rows, not time: some benchmark files step back in time)."""
    fig = _figure(12, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    rows = np.arange(len(anomaly))
    top.plot(rows, score, color="tab:blue", lw=0.6, label="detection score")
    if _spans_decades(np.asarray(score, dtype=np.float64)):
        top.set_yscale("log")
    top.set(ylabel=SCORE_LABEL)
    bottom.plot(rows, anomaly, color="tab:blue", lw=0.6, label="anomaly score")
    for (name, value), colour in zip(thresholds.items(), (ENTER_COLOUR, EXIT_COLOUR), strict=False):
        bottom.axhline(value, color=colour, lw=1.0, ls="--", label=f"{name} threshold {value:.3g}")
    for ax in (top, bottom):
        ax.axvspan(0, probation, color="grey", alpha=0.15, lw=0)
        for i, (a, b) in enumerate(windows):
            ax.axvspan(
                a, b, color="tab:red", alpha=0.15, lw=0, label="labelled window" if i == 0 else None
            )
    bottom.set(
        xlabel="row (grey: probationary period, not scored)",
        ylabel="anomaly score",
        ylim=(-0.02, 1.02),
    )
    bottom.legend(loc="upper left", fontsize="small")
    top.set_title(f"{path.stem}: {len(rows):,} rows")
    _save(fig, path)


def bucket_max(
    t: np.ndarray, values: np.ndarray, buckets: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per time bucket: start, end and the NaN-ignoring max of each column of `values` [n, m].

    The max, not every n-th point, so a one-sample spike still shows. Buckets with no sample are
    left out (the caller draws a gap); up to 2 * `buckets` points each point is its own bucket.
    """
    step = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
    step = step if step > 0 else 1.0
    width = (t[-1] - t[0]) / buckets if len(t) else 0.0
    if len(t) <= 2 * buckets or width <= 0:
        return t, t + step, values
    ids = np.minimum(((t - t[0]) / width).astype(np.int64), buckets - 1)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    left = t[0] + ids[starts] * width
    return left, left + width, np.fmax.reduceat(values, starts, axis=0)


# --- training report figures -------------------------------------------------------------------


def _loss_figure(result: TrainResult) -> Figure:
    from matplotlib.ticker import MaxNLocator

    m = result.manifest
    train = np.asarray(result.fit.history.get("train", []), dtype=np.float64)
    held = np.asarray(result.fit.history.get("heldback", []), dtype=np.float64)
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    if len(train) == 0:
        _empty(ax, "no loss history")
        return fig
    epochs = np.arange(1, len(train) + 1)
    ax.plot(epochs, train, marker="o", ms=3, label=_train_label(m.variant, m.noise))
    # Cross-fitted runs train the final model without held-back data; its "held-back" curve
    # repeats the training loss, so it is not drawn.
    show_held = len(held) == len(train) and not m.calibration.cross_fitted
    if show_held:
        ax.plot(epochs, held, marker="o", ms=3, label="held-back (clean input)")
    best = result.fit.best_epoch + 1
    ax.axvline(best, color="grey", ls="--", lw=1, label=f"best epoch {best} (weights kept)")
    marked = held if show_held else train
    ax.plot([best], [marked[best - 1]], "*", ms=14, color="black", zorder=3)
    if np.all(np.r_[train, held] > 0):
        ax.set_yscale("log")
    how = "cross-fitted: fixed epochs" if m.calibration.cross_fitted else "early stopping"
    ax.set(
        title=f"Loss per epoch ({how})",
        xlabel="epoch",
        ylabel="loss (mean squared error, standardised)",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    return fig


def _train_label(variant: str, noise: str) -> str:
    parts = ["corrupted input"] if noise != "none" else []
    if variant in ("sparse", "contractive", "variational"):
        parts.append(f"+ {variant} penalty")
    elif variant == "robust":
        parts.append("correntropy")
    return f"train ({', '.join(parts)})" if parts else "train"


def _scores_figure(result: TrainResult) -> Figure:
    m = result.manifest
    enter, exit_ = m.alarm.enter_threshold, m.alarm.exit_threshold
    s = np.asarray(result.heldback_scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    if len(s) == 0:
        _empty(ax, "no held-back scores")
    else:
        if _spans_decades(s):
            ax.set_xscale("log")
            s = s[s > 0]
            bins = np.geomspace(min(s.min(), exit_), max(s.max(), enter) * 1.1, 60)
        else:
            bins = np.linspace(min(s.min(), exit_), max(s.max(), enter) * 1.02, 60)
        ax.hist(s, bins=bins, color="tab:blue", alpha=0.8, label=f"{len(s):,} held-back windows")
        ax.set_yscale("log")  # the tail near the thresholds is a few windows out of thousands
    lines = ((enter, ENTER_COLOUR, "-", "enter"), (exit_, EXIT_COLOUR, "--", "exit"))
    for value, colour, ls, name in lines:
        ax.axvline(value, color=colour, ls=ls, lw=2, label=f"{name} threshold {value:.4g}")
        ax.text(
            value,
            0.97,
            name,
            color=colour,
            rotation=90,
            va="top",
            ha="right" if name == "exit" else "left",  # each on its outer side of the pair
            transform=ax.get_xaxis_transform(),
            fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1},
        )
    cal = m.calibration
    above = f"; {np.mean(s >= enter):.2%} at or above enter" if len(s) else ""
    ax.set(
        title=f"Held-back normal windows: {cal.rule} rule at q={cal.quantile:g}{above}",
        xlabel=SCORE_LABEL,
        ylabel="windows (count)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    return fig


def _codes_figure(result: TrainResult) -> Figure:
    from matplotlib.colors import LogNorm

    m = result.manifest
    codes = np.asarray(result.codes, dtype=np.float64)
    fig = _figure(13 if m.hashable else 7, 5)
    ax = fig.add_subplot(1, 2 if m.hashable else 1, 1)
    if codes.ndim != 2 or len(codes) < 2:
        _empty(ax, "too few codes to project")
    else:
        pick = np.linspace(0, len(codes) - 1, min(len(codes), MAX_SCATTER)).astype(int)
        xy, ratio = _pca2(codes[pick])
        scores = np.asarray(result.heldback_scores, dtype=np.float64)
        # Cross-fitted scores come from other models and do not line up with these codes.
        if len(scores) == len(codes):
            c = scores[pick]
            order = np.argsort(c)  # the highest scores drawn last, on top
            ok = np.isfinite(c[order]) & (c[order] > 0)
            norm = LogNorm() if _spans_decades(c) and ok.all() else None
            dots = ax.scatter(*xy[order].T, c=c[order], s=8, cmap="viridis", norm=norm)
            fig.colorbar(dots, ax=ax, label=SCORE_LABEL)
        else:
            ax.scatter(*xy.T, s=8, color="tab:blue")
        ax.set(
            title=f"Bottleneck codes, PCA of {len(pick):,} windows",
            xlabel=f"PC1 ({ratio[0]:.0%} of variance)",
            ylabel=f"PC2 ({ratio[1]:.0%} of variance)",
        )
        ax.grid(alpha=0.3)
    if m.hashable:
        _code_histogram(fig.add_subplot(1, 2, 2), codes, m.validation.code_binariness)
    return fig


def _pca2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components of the rows of `x` and their shares of variance."""
    centred = x - x.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    var = sv**2
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    xy = centred @ vt[:2].T
    pad = 2 - xy.shape[1]  # a one-unit code has one component
    return np.pad(xy, ((0, 0), (0, pad))), np.pad(ratio[:2], (0, pad))


def _code_histogram(ax: Axes, codes: np.ndarray, binariness: float | None) -> None:
    values = codes.ravel()
    if binariness is None and len(values):
        binariness = float(np.mean(np.abs(values - 0.5) > 0.4))
    ax.axvspan(0, 0.1, color="tab:green", alpha=0.15, label="near-binary (|code - 0.5| > 0.4)")
    ax.axvspan(0.9, 1, color="tab:green", alpha=0.15)
    ax.hist(values, bins=np.linspace(0, 1, 41), color="tab:blue", alpha=0.8)
    share = f": {binariness:.0%} near-binary" if binariness is not None else ""
    ax.set(
        title=f"Code unit values{share}",
        xlabel="code unit value (hash bit = value > 0.5)",
        ylabel="code values (count)",
        xlim=(0, 1),
    )
    ax.legend(fontsize=9, loc="upper center")
    ax.grid(alpha=0.3)


def _reconstruction_figure(result: TrainResult) -> Figure:
    m = result.manifest
    x = np.asarray(result.sample_windows, dtype=np.float64)[:4]
    r = np.asarray(result.sample_reconstructions, dtype=np.float64)[:4]
    if x.ndim != 3 or len(x) == 0:
        fig = _figure(7, 3)
        _empty(fig.add_subplot(), "no sample windows")
        return fig
    rows, cols = len(x), min(4, x.shape[2])
    # Per-channel error in the units the score uses, so a channel in Pa does not outrank one in bar.
    err = (((r - x) / np.asarray(m.channel_scale)) ** 2).mean(1)
    t = np.arange(x.shape[1]) * m.sample_period_s
    fig = _figure(3.2 * cols + 0.6, 2.1 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        for j, c in enumerate(np.argsort(err[i])[::-1][:cols]):
            ax = axes[i, j]
            ax.plot(t, x[i, :, c], color="black", lw=1.2, label="observed")
            ax.plot(t, r[i, :, c], color="tab:blue", lw=1.2, ls="--", label="reconstructed")
            ax.set_title(f"{m.channels[c]}: error {err[i, c]:.3g}", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"window {i + 1}, score {err[i].mean():.3g}\nvalue (raw units)")
            if i == rows - 1:
                ax.set_xlabel("time in window (s)")
        for j in range(cols, axes.shape[1]):
            axes[i, j].set_visible(False)
    kind = "training" if m.calibration.cross_fitted else "held-back"
    fig.suptitle(f"Sample {kind} windows: the channels with the largest reconstruction error")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside upper right", fontsize=9)
    return fig


# --- page --------------------------------------------------------------------------------------


def _facts(result: TrainResult) -> list[tuple[str, str]]:
    m = result.manifest
    cal, a, p, v = m.calibration, m.alarm, m.provenance, m.validation
    noise = f"{m.noise} {m.noise_level:g}" if m.noise != "none" else "none"
    params = ", ".join(f"{k} {val:.4g}" for k, val in cal.parameters.items())
    target = (
        f" (target {cal.target_false_alarms_per_day:g})"
        if cal.target_false_alarms_per_day is not None
        else ""
    )
    facts = [
        (
            "architecture / variant",
            f"{m.architecture} / {m.variant}; noise {noise}; code size {m.code_size}"
            + ("; hashing" if m.hashable else ""),
        ),
        (
            "window × channels",
            f"{m.window} × {len(m.channels)} ({m.window * m.sample_period_s:g} s at "
            f"{m.sample_period_s:g} s per sample)",
        ),
        (
            "rows",
            f"{p.rows:,} ({p.train_windows:,} training windows, {cal.windows:,} held-back windows)",
        ),
        (
            "epochs",
            f"{result.fit.epochs} (best {result.fit.best_epoch + 1}); loss train "
            f"{v.train_loss:.4g}, held-back {v.heldback_loss:.4g}",
        ),
        ("training seconds", f"{p.train_seconds:.1f} fitting, {result.seconds:.1f} in all"),
        (
            "thresholds",
            f"enter {a.enter_threshold:.4g} / exit {a.exit_threshold:.4g}; alarm on {a.k} of "
            f"{a.n} windows, ends after {a.clear_windows} below exit",
        ),
        (
            "calibration rule",
            f"{cal.rule} at q={cal.quantile:g} (exit q={cal.exit_quantile:g})"
            + (f"; {params}" if params else "")
            + ("; cross-fitted" if cal.cross_fitted else ""),
        ),
        (
            "false alarms / day",
            f"{cal.false_alarms_per_day:.3g} estimated over {cal.heldback_hours:.1f} h of "
            f"held-back data{target}",
        ),
        ("parity error", f"{v.parity_max_rel_error:.1e} (max relative, torch vs onnxruntime)"),
    ]
    if m.hashable:
        b = v.code_binariness
        share = f"{b:.1%} of code units farther than 0.4 from 0.5" if b is not None else "n/a"
        facts.append(("code binariness", share))
    if m.constant_channels:
        facts.append(("near-constant channels", ", ".join(m.constant_channels)))
    roles = m.channel_roles()
    for role, meaning in (("context", "model inputs, not scored"), ("ignore", "not used")):
        if names := [c for c, r in zip(m.channels, roles, strict=True) if r == role]:
            facts.append((f"{role} channels", f"{', '.join(names)} ({meaning})"))
    return facts


_CAPTIONS = {
    "loss.png": "Loss per epoch; the star marks the epoch whose weights were kept.",
    "scores.png": "Scores of held-back normal windows and the alarm thresholds calibrated on them.",
    "codes.png": "Bottleneck codes projected on their two main directions, coloured by score.",
    "reconstructions.png": "Observed vs reconstructed signals of a few held-back windows.",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { text-align: left; padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; }
th { background: #f5f5f5; white-space: nowrap; }
.warn { color: #a15c00; }
figure { margin: 1.5em 0; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption, .meta { color: #666; font-size: 0.9em; }
"""


def _html(result: TrainResult) -> str:
    m = result.manifest
    esc = html.escape
    rows = [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _facts(result)]
    notes = [*result.notes, *m.calibration.warnings]
    if notes:
        items = "".join(f"<li>{esc(n)}</li>" for n in notes)
        rows.append(f'<tr><th>notes / warnings</th><td class="warn"><ul>{items}</ul></td></tr>')
    figures = [
        f'<figure><img src="{name}" alt="{esc(_CAPTIONS[name])}">'
        f"<figcaption>{esc(_CAPTIONS[name])}</figcaption></figure>"
        for name in FIGURES
    ]
    title = f"{m.name} v{m.version}: training report"
    meta = (
        f"created {m.created}; data {m.provenance.source or 'unnamed'} "
        f"(sha256 {m.provenance.data_fingerprint[:12]}); oteo {m.provenance.oteo_version}"
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{esc(title)}</h1>",
            f'<p class="meta">{esc(meta)}</p>',
            "<table>",
            *rows,
            "</table>",
            *figures,
            "</body></html>",
            "",
        ]
    )


# --- helpers -----------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    fig.clear()  # drop the artists now rather than when the figure is collected


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_axis_off()


def _spans_decades(x: np.ndarray, decades: float = 2.0) -> bool:
    pos = x[np.isfinite(x) & (x > 0)]
    return len(pos) > 1 and float(pos.max() / pos.min()) > 10**decades


def _datenum(unix_s: np.ndarray) -> np.ndarray:
    from matplotlib import dates

    return np.asarray(dates.date2num((unix_s * 1e6).astype("datetime64[us]")))


def _date_axis(ax: Axes) -> None:
    from datetime import UTC

    from matplotlib import dates

    locator = dates.AutoDateLocator(tz=UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator, tz=UTC))
    ax.set_xlabel("time (UTC)")


def _spans(
    ax: Axes,
    x0: np.ndarray,
    x1: np.ndarray,
    mask: np.ndarray,
    gap: np.ndarray,
    height: tuple[float, float],
    colour: str,
    alpha: float,
    label: str,
) -> None:
    """Shade each run of `mask` (split at gaps) over the axes-fraction band `height`."""
    from matplotlib.collections import PolyCollection

    prev = np.r_[False, mask[:-1] & ~gap]
    nxt = np.r_[mask[1:] & ~gap, False]
    starts, ends = np.flatnonzero(mask & ~prev), np.flatnonzero(mask & ~nxt)
    if len(starts) == 0:
        return
    lo, hi = height
    verts: Any = [
        [(x0[a], lo), (x1[b], lo), (x1[b], hi), (x0[a], hi)]
        for a, b in zip(starts, ends, strict=True)
    ]
    spans = PolyCollection(
        verts,
        facecolors=colour,
        edgecolors="none",
        alpha=alpha,
        label=label,
        transform=ax.get_xaxis_transform(),
    )
    ax.add_collection(spans, autolim=False)
