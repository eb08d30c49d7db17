"""Which partition a stream belongs to: the broker's function, so the daemon can say it too.

nats-server's subject mapping `{{partition(P,1)}}` hashes the stream token of
`sensors.<stream>.data` with FNV-1a (32 bits) and takes it modulo P; `oteo partition STREAM
--count P` prints the same number (an integration test checks it against a real nats-server).
"""

from __future__ import annotations

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """The 32-bit FNV-1a hash of `data`."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(stream: str, count: int) -> int:
    """The partition (0 .. count - 1) the broker maps `stream`'s readings to."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    return fnv1a_32(stream.encode("utf-8")) % count


def nats_mapping(count: int, input_prefix: str = "sensors", topic_prefix: str = "part") -> str:
    """The nats-server `mappings` entry that partitions `input_prefix/<stream>/data` topics."""
    src = input_prefix.replace("/", ".")
    dst = topic_prefix.replace("/", ".")
    # `1`: the first (only) `*` of the source subject, the stream token.
    return f'"{src}.*.data": "{dst}.{{{{partition({count},1)}}}}.{src}.{{{{wildcard(1)}}}}.data"'
