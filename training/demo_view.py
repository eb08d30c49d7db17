"""What `oteo demo` shows: event lines, per-stream score bars and the live terminal screen.

Standard library only: the screen is redrawn in place with ANSI escape codes (alternate screen,
cursor home, clear to end of line), colours only on a terminal. Everything here is a pure
function of the data it is given, so it can be tested without a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

STATES = ("normal", "anomalous", "stale", "warming_up", "muted")

# ANSI: select graphic rendition.
RESET = "\x1b[0m"
BOLD = "\x1b[1m"
DIM = "\x1b[2m"
RED = "\x1b[31m"
GREEN = "\x1b[32m"
YELLOW = "\x1b[33m"
MAGENTA = "\x1b[35m"
CYAN = "\x1b[36m"
STATE_COLOURS = {
    "normal": GREEN,
    "anomalous": BOLD + RED,
    "stale": DIM,
    "warming_up": YELLOW,
    "muted": MAGENTA,
}
# Alternate screen + hidden cursor on entry; the reverse on exit.
ENTER_SCREEN = "\x1b[?1049h\x1b[?25l"
LEAVE_SCREEN = "\x1b[?25h\x1b[?1049l"
HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"

BAR_SPAN = 3.0
"""A bar is full at this multiple of the threshold; the threshold mark sits at 1/BAR_SPAN."""


@dataclass
class StreamRow:
    """The latest known state of one stream."""

    stream: str
    state: str = "warming_up"
    score: float | None = None
    threshold: float | None = None


@dataclass
class EventLine:
    """One anomaly event as received on `oteo/{stream}/event`, with its arrival time."""

    elapsed_s: float
    kind: str
    stream: str
    score: float
    threshold: float
    peak_score: float
    top: list[tuple[str, float, str]] = field(default_factory=list)

    @classmethod
    def from_payload(cls, doc: dict[str, Any], elapsed_s: float) -> EventLine:
        top = [
            (str(c["channel"]), float(c["contribution"]), str(c["direction"]))
            for c in doc.get("top_channels", [])
        ]
        return cls(
            elapsed_s=elapsed_s,
            kind=str(doc["kind"]),
            stream=str(doc["stream"]),
            score=float(doc["score"]),
            threshold=float(doc["threshold"]),
            peak_score=float(doc.get("peak_score", doc["score"])),
            top=top,
        )


def format_clock(seconds: float) -> str:
    """`m:ss` (or `h:mm:ss`) of elapsed seconds."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_event(event: EventLine) -> str:
    """One plain line: `[0:09] sim-1 anomaly start  score 0.18 = 8.8× threshold  top …`."""
    ratio = event.score / event.threshold if event.threshold > 0 else math.inf
    if event.kind == "end":
        what = f"peak {event.peak_score:.3g} = {event.peak_score / event.threshold:.1f}× threshold"
    else:
        what = f"score {event.score:.3g} = {ratio:.1f}× threshold"
    top = ", ".join(f"{name} {share:.0%} {direction}" for name, share, direction in event.top)
    return f"[{format_clock(event.elapsed_s)}] {event.stream} anomaly {event.kind:<6} {what}" + (
        f"  top: {top}" if top else ""
    )


def score_bar(score: float | None, threshold: float | None, width: int, colour: bool) -> str:
    """`[####····|·········]`: the score against the threshold (the `|`), full at 3×."""
    inner = max(4, width - 2)
    mark = round(inner / BAR_SPAN)
    if score is None or threshold is None or threshold <= 0:
        cells = ["·"] * inner
        cells[mark] = "|"
        return "[" + "".join(cells) + "]"
    ratio = score / threshold
    filled = min(inner, round(inner * min(ratio, BAR_SPAN) / BAR_SPAN))
    cells = ["#" if i < filled else "·" for i in range(inner)]
    cells[mark] = "|"
    body = "".join(cells)
    if ratio > BAR_SPAN:
        body = body[:-1] + ">"
    if colour:
        tint = RED if ratio >= 1 else GREEN
        body = tint + body + RESET
    return "[" + body + "]"


def format_row(row: StreamRow, bar_width: int, colour: bool) -> str:
    """`sim-1   anomalous   0.1840 / 0.0209  8.80×  [####…|…]`."""
    state = row.state
    label = f"{state:<11}"
    if colour:
        label = STATE_COLOURS.get(state, "") + label + RESET
    if row.score is None or row.threshold is None:
        numbers = f"{'-':>8} / {'-':<8} {'':>7}"
    else:
        numbers = f"{row.score:>8.4f} / {row.threshold:<8.4f} {row.score / row.threshold:>6.2f}×"
    bar = score_bar(row.score, row.threshold, bar_width, colour)
    return f"{row.stream:<10} {label} {numbers} {bar}"


def render(
    header: Sequence[str],
    rows: Sequence[StreamRow],
    events: Sequence[EventLine],
    *,
    width: int,
    height: int,
    colour: bool,
) -> str:
    """The whole screen, to be written after `HOME`: each line clears its own rest."""
    width = max(40, width)
    lines = list(header)
    lines.append("")
    bar_width = max(12, min(42, width - 52))
    title = f"{'stream':<10} {'state':<11} {'score':>8} / {'threshold':<9}{'ratio':>7} "
    title += "threshold |, full at 3×"
    lines.append(BOLD + title + RESET if colour else title)
    lines += [format_row(row, bar_width, colour) for row in rows]
    lines.append("")
    lines.append(BOLD + "events" + RESET if colour else "events")
    room = max(1, height - len(lines) - 1)
    recent = list(events)[-room:]
    if not recent:
        lines.append("(none yet: the first fault starts a few seconds in)")
    for event in recent:
        text = format_event(event)[:width]
        if colour:
            tint = {"start": RED, "end": GREEN}.get(event.kind, CYAN)
            text = tint + text + RESET
        lines.append(text)
    clipped = [_clip(line, width) for line in lines[: max(1, height - 1)]]
    return HOME + "".join(line + CLEAR_LINE + "\n" for line in clipped) + CLEAR_BELOW


def _clip(line: str, width: int) -> str:
    """Cut a line to the terminal width, not counting escape sequences."""
    out: list[str] = []
    visible = 0
    i = 0
    while i < len(line):
        if line[i] == "\x1b":
            end = line.find("m", i)
            end = end if end >= 0 else len(line) - 1
            out.append(line[i : end + 1])
            i = end + 1
            continue
        if visible < width:
            out.append(line[i])
            visible += 1
        i += 1
    return "".join(out)
