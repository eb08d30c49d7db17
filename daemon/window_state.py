"""A stream's window state as JSON and back: the tail of a partition checkpoint.

`snapshot_window` writes what a `StreamBuffer` needs to go on as if never stopped (the newest
window's samples, the grid's phase, the last `seq`, readings held for reordering);
`restore_window` puts it into an empty buffer of the same shape. Both read and write the
buffer's ring directly: this module is the one other place that knows its layout.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from daemon.window import StreamBuffer


def snapshot_window(buffer: StreamBuffer) -> dict[str, Any]:
    """The newest window's samples and the grid's phase, JSON-able (a checkpoint's tail).

    Enough to go on as if never stopped: the next window is made of these samples and the
    ones still to come. Held (reordering) readings are kept too.
    """
    b = buffer
    n = min(b._count, b.window)
    rows = [(b._pos - back) % b._capacity for back in range(n - 1, -1, -1)]
    return {
        "last_ts": b.last_ts,
        # float32 bytes, base64: exact, and ~10x cheaper to write than a list of floats
        "values": base64.b64encode(b._buf[rows].astype("<f4").tobytes()).decode("ascii"),
        "received": [b._received[r] for r in rows],
        "until_ready": b._until_ready,
        "last_seq": b._last_seq,
        "held": [(ts, seq, b._stage[row].tolist()) for ts, _, row, seq in b._held],
    }


def restore_window(buffer: StreamBuffer, doc: dict[str, Any]) -> None:
    """Take a `snapshot_window` back (ValueError/KeyError/TypeError if it does not fit)."""
    b = buffer
    raw = base64.b64decode(doc["values"], validate=True)
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(-1, b.channels)
    n = len(values)
    received = [bool(r) for r in doc["received"]]
    until_ready = int(doc["until_ready"])
    if n > b.window or len(received) != n or not 1 <= until_ready <= b.window:
        raise ValueError("window snapshot does not fit this buffer")
    last_seq = doc["last_seq"]
    b.reset()
    b._last_seq = None if last_seq is None else int(last_seq)
    if n:
        last_ts = float(doc["last_ts"])
        b._anchor = last_ts - (n - 1) * b.period_s
        b._last_slot = n - 1
        b._buf[:n] = values
        b._received[:n] = received
        b._pos = n - 1
        b._count = b._total = n
        b._until_ready = until_ready
    for ts, seq, row in doc["held"]:
        b.push(float(ts), np.asarray(row, dtype=np.float64), seq)
    b._ready.clear()  # windows a held reading completed were scored before the stop
