"""`[partitions]`: streams partitioned over instances by the broker (one session per partition).

The broker (nats-server's subject mapping) republishes `sensors/<stream>/data` on
`<topic_prefix>/<k>/sensors/<stream>/data`, k = FNV-1a 32 of the stream id mod `count`. An
instance owns a fixed set of partitions (`owned`, or every k with k mod `of` = `index`) and holds
one persistent MQTT 3.1.1 session per partition (client id `oteo-<group>-part-<k>`), so a
partition and its backlog can move to another instance that connects with the same client id.
Only `<input_prefix>/<stream>/data` readings are partitioned: with partitions on, per-channel
topics are not subscribed to. Stream ids must not contain `.` (nats-server's subject separator:
it closes the connection of an MQTT client publishing such a topic).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from daemon.section import Section
from daemon.setting import FilePath, TopicId, TopicPrefix

# nats-server's default max_ack_pending for an MQTT consumer: held acks must stay below it.
MAX_ACK_PENDING = 1024


class PartitionsSection(Section):
    """Partitioned intake; without `count` the daemon subscribes to every stream itself."""

    count: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Partitions P in the broker's mapping (`partition(P,1)`); unset: off.",
    )
    owned: list[int] | None = Field(
        None, description="The partitions this instance owns (or give index and of)."
    )
    index: int | None = Field(
        None, ge=0, description="This instance's index: it owns every k with k mod `of` = index."
    )
    of: int | None = Field(None, ge=1, description="Number of instances sharing the partitions.")
    group: TopicId = Field(
        "oteo", description="Names the sessions: client id `oteo-<group>-part-<k>`."
    )
    topic_prefix: TopicPrefix = Field(
        "part", description="The mapping's prefix: readings arrive on `<prefix>/<k>/sensors/...`."
    )
    checkpoint_readings: int = Field(
        256,
        ge=1,
        lt=MAX_ACK_PENDING,
        description="A partition's checkpoint is written after this many readings (or messages: "
        f"acks held for them stay below the broker's {MAX_ACK_PENDING} pending acks).",
    )
    checkpoint_s: float = Field(
        5.0, gt=0, le=3600, description="...or at least this often while readings arrive."
    )
    checkpoint_dir: FilePath | None = Field(
        None,
        description="Where partition checkpoints live; default `state_dir/partitions`. Instances "
        "on one box may share it, so a partition moving between them resumes its windows; it is "
        "not shared across boxes (a partition moving to another box starts its windows cold).",
    )
    ack_after_checkpoint: bool = Field(
        True,
        description="Acknowledge a reading only once a checkpoint holds it: a crash loses none "
        "(the broker redelivers; readings the checkpoint already holds are dropped as duplicates).",
    )
    redelivery_wait_s: float = Field(
        45.0,
        ge=0,
        le=3600,
        description="After an unclean stop, wait this long after the dead run's last sign of "
        "life before taking the partitions: the broker's ack_wait (after which it redelivers what "
        "was not acknowledged) plus a margin of 10-15 s, as the broker goes on delivering to the "
        "dead run for seconds. Too short, and redeliveries come after newer readings and are "
        "lost (oteo_redelivered_late_total).",
    )

    @model_validator(mode="after")
    def _check_ownership(self) -> PartitionsSection:
        if self.ack_after_checkpoint and 0 < self.redelivery_wait_s <= self.checkpoint_s:
            # Acks held longer than the broker's ack_wait come back as redeliveries.
            raise ValueError(
                "checkpoint_s must be below redelivery_wait_s (and the broker's ack_wait)"
            )
        if self.count is None:
            given = [n for n in ("owned", "index", "of") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} need count (the number of partitions)")
            return self
        if self.owned is not None:
            if self.index is not None or self.of is not None:
                raise ValueError("give either owned or index and of, not both")
            bad = [k for k in self.owned if not 0 <= k < self.count]
            if bad:
                raise ValueError(f"owned: partition {bad[0]} is not in 0..{self.count - 1}")
            if len(set(self.owned)) != len(self.owned):
                raise ValueError("owned: a partition is listed twice")
            if not self.owned:
                raise ValueError("owned: give at least one partition")
            return self
        if self.index is None or self.of is None:
            raise ValueError("give owned, or both index and of")
        if self.index >= self.of:
            raise ValueError(f"index: {self.index} is not below of ({self.of})")
        if self.of > self.count:
            raise ValueError(f"of: {self.of} instances for {self.count} partitions leave some idle")
        return self

    @property
    def enabled(self) -> bool:
        return self.count is not None

    @property
    def partitions(self) -> tuple[int, ...]:
        """The partitions this instance owns, in order (empty when partitions are off)."""
        if self.count is None:
            return ()
        if self.owned is not None:
            return tuple(sorted(self.owned))
        assert self.index is not None and self.of is not None
        return tuple(k for k in range(self.count) if k % self.of == self.index)

    def client_id(self, k: int) -> str:
        return f"oteo-{self.group}-part-{k}"

    def topic(self, k: int, input_prefix: str) -> str:
        """The subscription of partition k's session."""
        return f"{self.topic_prefix}/{k}/{input_prefix}/+/data"
