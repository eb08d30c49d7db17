"""The `oteo` command line: a thin adapter over the runtime's objects.

Commands that need the trainer (`train`, `evaluate`, `simulate`, ...) are registered by the
`training` package through the `oteo.commands` entry-point group and loaded only when used, so the
edge runtime never imports torch or `training`.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

import click

from daemon import __version__
from daemon.distribution import DistributionError, check_distribution

EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus keeps it from restart-looping


class _PluginGroup(click.Group):
    """A click group that also offers commands registered under the `oteo.commands` entry points."""

    def _plugins(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group="oteo.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        ep = self._plugins().get(cmd_name)
        if ep is None:
            return None
        try:
            loaded = ep.load()
        except ImportError:  # e.g. an edge install without the trainer's extras
            return None
        return loaded if isinstance(loaded, click.Command) else None


@click.group(cls=_PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="oteo")
@click.option("-v", "--verbose", count=True, help="Debug log output.")
def main(verbose: int) -> None:
    """oteo: autoencoder anomaly detection for machine sensor streams over MQTT."""
    try:
        check_distribution()
    except DistributionError as exc:
        refuse(exc)
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def refuse(exc: Exception) -> NoReturn:
    """Exit 78 with one `error:` line: a bad config, model or data file (not a usage error)."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_CONFIG)


def load_model_or_exit(path: Path) -> Any:
    """The validated model file, or one `error:` line and exit 78."""
    from daemon.model import Model, ModelFileError

    try:
        return Model.load(path)
    except ModelFileError as exc:
        refuse(exc)


@main.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option(
    "--example-request",
    is_flag=True,
    help="Print a valid denoise/encode/hash/score request body instead: one window of the "
    "model's training means.",
)
def inspect(model_path: Path, as_json: bool, example_request: bool) -> None:
    """Print a model file's manifest (validated by the same loader the daemon uses)."""
    from daemon.inspect_text import describe

    model = load_model_or_exit(model_path)
    m = model.manifest
    if example_request:
        window = [[round(v, 6) for v in m.channel_mean]] * m.window
        click.echo(json.dumps({"id": "example-1", "windows": [window]}))
        return
    if as_json:
        doc = {"path": str(model_path), "sha256": model.sha256, "manifest": m.model_dump()}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(describe(model_path, model.sha256, m))


def _overrides(model: Path | None, broker: str | None, http: str | None) -> dict[str, Any]:
    """Dotted config overrides from the quick-use flags."""
    out: dict[str, Any] = {}
    if model is not None:
        out["model.path"] = str(model)
    if broker is not None:
        out["mqtt.url"] = broker
    if http is not None:
        host, _, port = http.rpartition(":")
        if not host or not port.isdigit():
            raise click.BadParameter("use HOST:PORT, e.g. 127.0.0.1:9108", param_hint="--http")
        out["http.bind"] = host.strip("[]")
        out["http.port"] = int(port)
    return out


@main.command()
@click.argument("stream", required=False)
@click.option("--count", type=click.IntRange(min=1), required=True, help="Number of partitions P.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--mapping", is_flag=True, help="Print nats-server's `mappings` entry instead.")
def partition(stream: str | None, count: int, as_json: bool, mapping: bool) -> None:
    """Print the partition the broker's mapping puts STREAM's readings on (FNV-1a 32 mod P)."""
    from daemon.partition import nats_mapping, partition_of

    if mapping:
        click.echo(f"mappings = {{ {nats_mapping(count)} }}")
        return
    if stream is None:
        raise click.UsageError("give a STREAM id (or --mapping)")
    k = partition_of(stream, count)
    if as_json:
        click.echo(json.dumps({"stream": stream, "count": count, "partition": k}))
    else:
        click.echo(k)


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
def check_config(config_path: Path) -> None:
    """Run every start-up check and print the effective config (secrets redacted).

    The checks `oteo run` makes before serving: the file, its secret and TLS files, the model it
    names and the alarm overrides against the model's own policy. The config goes to stdout as
    JSON; the model and the effective alarm policy to stderr.
    """
    from daemon.startup import REFUSALS, load_startup

    try:
        startup = load_startup(config_path)
    except REFUSALS as exc:
        refuse(exc)
    click.echo(json.dumps(startup.cfg.redacted(), indent=2, default=str))
    model, policy = startup.model, startup.policy
    m = model.manifest
    click.echo(f"model {model.path}: {m.name} {m.version}, sha256 {model.sha256}", err=True)
    overridden = startup.overridden()
    source = f"set by the config: {', '.join(overridden)}" if overridden else "the model's"
    click.echo(
        f"alarm policy ({source}): enter {policy.enter_threshold:.4g}, "
        f"exit {policy.exit_threshold:.4g}, hop {policy.hop}, {policy.k} of {policy.n} windows, "
        f"clear after {policy.clear_windows}, cool-down {policy.cooldown_windows}, "
        f"smoothing {policy.smoothing_alpha:g}",
        err=True,
    )
    click.echo(f"{config_path}: OK", err=True)


@main.command()
@click.argument("config_file", required=False, type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config.")
@click.option("--model", type=click.Path(path_type=Path), help="Model file (overrides config).")
@click.option("--broker", help="Broker URL, e.g. mqtt://127.0.0.1:1883 (overrides config).")
@click.option("--http", help="HTTP bind HOST:PORT (overrides config).")
@click.option(
    "--instance", envvar="OTEO_INSTANCE", help="This daemon's id (overrides config; $OTEO_INSTANCE)"
)
@click.option(
    "--partition-index",
    type=click.IntRange(min=0),
    envvar="OTEO_PARTITION_INDEX",
    help="[partitions] index (overrides config; $OTEO_PARTITION_INDEX: a StatefulSet ordinal)",
)
def run(
    config_file: Path | None,
    config_path: Path | None,
    model: Path | None,
    broker: str | None,
    http: str | None,
    instance: str | None,
    partition_index: int | None,
) -> None:
    """Run the daemon in the foreground (for systemd); SIGTERM or Ctrl-C stop it cleanly."""
    from daemon.config import load_config
    from daemon.service import Daemon
    from daemon.startup import REFUSALS, StartupError

    if config_file is not None and config_path is not None:
        raise click.UsageError("give the config file once: CONFIG or --config, not both")
    config_path = config_path or config_file
    overrides = _overrides(model, broker, http)
    if instance is not None:
        overrides["instance"] = instance
    if partition_index is not None:
        overrides["partitions.index"] = partition_index
    if config_path is None and "model.path" not in overrides:
        raise click.UsageError("give --config FILE or at least --model MODEL.onnx")
    try:
        cfg = load_config(config_path, overrides)
        # The Daemon runs the start-up checks of `oteo check-config` (daemon/startup.py).
        daemon = Daemon(cfg, config_path=config_path, overrides=overrides)
        code = daemon.run()
    except (*REFUSALS, StartupError) as exc:
        refuse(exc)
    sys.exit(code)


@main.command()
@click.argument("csv_path", type=click.Path(path_type=Path))
@click.option("--broker", required=True, help="mqtt://host[:port] or mqtts://host[:port].")
@click.option("--stream", help="Stream id in the topic (default: the file name without .csv).")
@click.option(
    "--rate", type=float, help="Readings per second (default: the CSV's own pace, 1 / period)."
)
@click.option("--loop", is_flag=True, help="Start again at the end, until Ctrl-C.")
@click.option(
    "--now", "now_based", is_flag=True, help="Timestamps from this host's clock, a period apart."
)
@click.option("--channels", help="Comma-separated columns to send (default: every numeric one).")
@click.option("--time-column", help="Timestamp column (default: found by its name).")
@click.option(
    "--label-column",
    "label_columns",
    multiple=True,
    default=("anomaly", "changepoint"),
    show_default=True,
    help="Columns never sent.",
)
@click.option("--period", type=float, help="Sample period in seconds (default: from the data).")
@click.option(
    "--topic-prefix", default="sensors", show_default=True, help="As topics.input_prefix."
)
@click.option("--username", help="Broker user name; the password comes from $OTEO_MQTT_PASSWORD.")
def replay(
    csv_path: Path,
    broker: str,
    stream: str | None,
    rate: float | None,
    loop: bool,
    now_based: bool,
    channels: str | None,
    time_column: str | None,
    label_columns: tuple[str, ...],
    period: float | None,
    topic_prefix: str,
    username: str | None,
) -> None:
    """Publish a CSV's rows as readings on {prefix}/{stream}/data (QoS 1), to try the daemon.

    Each row is `{"ts": ..., "seq": ..., "values": {column: number}}`; label columns are not
    sent. Timestamps are the CSV's own unless --now. Ctrl-C stops it.
    """
    from daemon.replay import ReplayPlan
    from daemon.replay import replay as run_replay

    if rate is not None and not rate > 0:
        raise click.BadParameter("must be above 0", param_hint="--rate")
    if period is not None and not period > 0:
        raise click.BadParameter("must be above 0", param_hint="--period")
    plan = ReplayPlan(
        _replay_broker(broker, username),
        _stream_id(stream if stream is not None else csv_path.stem),
        rate_hz=rate,
        loop=loop,
        now=now_based,
        prefix=topic_prefix,
    )
    series = _replay_series(csv_path, channels, time_column, label_columns, period, now_based)
    pace = f"{plan.rate_hz:g}/s" if plan.rate_hz else f"one per {series.period_s:g} s"
    click.echo(
        f"{series.source}: {len(series.values)} readings of {', '.join(series.channels)} "
        f"to {plan.topic}, {pace}{' (loop)' if loop else ''}"
    )
    for note in series.notes:
        click.echo(f"note: {note}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        count = run_replay(series, plan, stop)
    except ConnectionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(
        f"published {count.published} readings ({count.acknowledged} acknowledged, "
        f"{count.passes} full pass{'es' if count.passes != 1 else ''})"
    )


def _replay_broker(url: str, username: str | None) -> Any:
    """The broker as a config section (its checks: mqtt[s]://host[:port], no credentials)."""
    from pydantic import ValidationError

    from daemon.config import MqttSection

    try:
        return MqttSection.model_validate({"url": url, "username": username})
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise click.BadParameter(message, param_hint="--broker") from exc


def _stream_id(stream: str) -> str:
    if not stream or re.search(r"[+#/\s]", stream):
        raise click.BadParameter(
            f"{stream!r} is not a stream id (no + # / or whitespace)", param_hint="--stream"
        )
    return stream


def _replay_series(
    path: Path,
    channels: str | None,
    time_column: str | None,
    label_columns: tuple[str, ...],
    period_s: float | None,
    now_based: bool,
) -> Any:
    """The CSV as a series to replay, or one `error:` line and exit 78."""
    from daemon.series import SeriesError, read_series

    try:
        return read_series(
            path,
            channels=[c.strip() for c in channels.split(",") if c.strip()] if channels else None,
            time_column=time_column,
            label_columns=label_columns,
            period_s=period_s,
            need_timestamps=not now_based,
        )
    except SeriesError as exc:
        refuse(exc)
