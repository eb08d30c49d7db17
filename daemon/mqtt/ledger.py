"""Acknowledgements held until a checkpoint holds the reading (one partition's session).

With `ack_after_checkpoint`, a reading is acknowledged to the broker only once the partition's
checkpoint on disk holds what it changed; a crash before that leaves it unacknowledged, and the
broker delivers it again to whoever takes the partition. Two threads meet here:

- the link's network thread numbers each message it hands to the intake (`issue`), says whether
  the intake queued it (`queued`), keeps the message id of a queued one (`keep`) and, every
  step, acknowledges those a checkpoint covers (`release`);
- the main loop, after writing a checkpoint that holds every reading up to ticket n, calls
  `cover(n)` (one int assignment: atomic under the GIL) and wakes the link.

Ids held from a connection that was lost are dropped: the broker redelivers those messages
(duplicates of what the checkpoint holds are dropped by the stream's window).
"""

from __future__ import annotations

from collections import deque


class AckLedger:
    """Held message ids, each with the ticket the intake gave its reading."""

    def __init__(self) -> None:
        self._held: deque[tuple[int, int, int]] = deque()  # (ticket, mid, generation)
        self._last_ticket = 0  # network thread
        self._queued: int | None = None  # ticket of the message just queued (network thread)
        self.covered = 0  # main loop: every ticket up to this is in a checkpoint

    def __len__(self) -> int:
        return len(self._held)

    def issue(self) -> int:
        """The ticket of the next message offered to the intake (network thread)."""
        self._last_ticket += 1
        return self._last_ticket

    def queued(self, ticket: int) -> None:
        """The intake queued the message with this ticket: keep its ack (network thread)."""
        self._queued = ticket

    def keep(self, mid: int, generation: int) -> bool:
        """Hold this message's ack if the intake queued it; False: acknowledge it now."""
        ticket, self._queued = self._queued, None
        if ticket is None:
            return False  # dropped (bad payload) or not a reading: nothing to checkpoint
        self._held.append((ticket, mid, generation))
        return True

    def cover(self, ticket: int) -> None:
        """A checkpoint holds every reading up to `ticket` (main loop)."""
        if ticket > self.covered:
            self.covered = ticket

    def release(self, generation: int) -> list[int]:
        """Message ids to acknowledge now on connection `generation` (network thread)."""
        covered = self.covered
        out: list[int] = []
        held = self._held
        while held and (held[0][0] <= covered or held[0][2] != generation):
            _, mid, gen = held.popleft()
            if gen == generation:
                out.append(mid)
        return out
