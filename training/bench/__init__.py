"""`oteo benchmark`: detection quality on public labelled data, and speed.

Each subcommand lives in its own module with light top-level imports (click, numpy, stdlib);
training and plotting are imported inside the commands.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute"; modules are imported only when their command is used.
SUBCOMMANDS = {
    "skab": "training.bench.skab:skab",
    "nab": "training.bench.nab:nab",
    "smap": "training.bench.smap:smap",
    "suite": "training.bench.suite:suite",
    "recorder": "training.bench.recorder:recorder",
    "throughput": "training.bench.throughput:throughput",
    "scale": "training.bench.scale:scale",
    "similar": "training.bench.similar:similar",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        try:
            command = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError:
            return None
        return command if isinstance(command, click.Command) else None


@click.group(cls=_LazyGroup)
def benchmark() -> None:
    """Benchmarks: detection quality on SKAB / NAB / SMAP-MSL and the suite of all three (give
    the data folder), recorder overhead, throughput, partitioned instances on NATS (scale) and
    similar-window search."""
