"""Trainer commands for the `oteo` CLI (registered through the `oteo.commands` entry points).

Heavy imports (torch, pandas, matplotlib) happen inside the commands, so listing the CLI's help
stays fast and torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from daemon.cli import EXIT_CONFIG, load_model_or_exit, refuse
from training.config import (
    ARCHITECTURES,
    BASELINE_RULES,
    COMBINATIONS,
    ERRORS,
    NOISES,
    ROLES,
    SAMPLES,
    VARIANTS,
    option_fields,
    setting_field,
)
from training.preset import PRESETS


def _csv_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _data_options(f):  # type: ignore[no-untyped-def]
    """Options shared by commands that read a table of sensor data."""
    opts = [
        click.option("--time-column", help="Timestamp column (default: auto-detected)."),
        click.option("--channels", help="Comma-separated channel columns (default: all numeric)."),
        click.option(
            "--label-column",
            "label_columns",
            multiple=True,
            default=("anomaly", "changepoint"),
            show_default=True,
            help="Label columns: never used as channels; rows with anomaly=1 are not trained on.",
        ),
        click.option("--period", type=float, help="Sample period in seconds (default: inferred)."),
        click.option("--max-gap", type=float, help="Longest gap (s) to fill; longer ones split."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _load(path: Path, time_column, channels, label_columns, period, max_gap):  # type: ignore[no-untyped-def]
    from training.data import DataError, load_table

    try:
        return load_table(
            path,
            time_column=time_column,
            channels=_csv_list(channels),
            label_columns=tuple(label_columns),
            period_s=period,
            max_gap_s=max_gap,
        )
    except (DataError, OSError) as exc:
        # A bad data file is like a bad model file: one line, exit 78 (not click's usage error).
        message = str(exc) if path.name in str(exc) else f"{path}: {exc}"
        refuse(DataError(message))


def _names(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    return tuple(_csv_list(value) or ())


def _setting_options(command: Any) -> Any:
    """One option per training setting with a help text (training/config.py), its default and
    choices taken from there: the settings are defined once."""
    for f in reversed(option_fields()):
        flag = "--" + ("epochs" if f.name == "max_epochs" else f.name).replace("_", "-")
        choices = {
            "architecture": ARCHITECTURES,
            "variant": VARIANTS,
            "noise": NOISES,
            "error": ERRORS,
            "sample": SAMPLES,
            "combine": COMBINATIONS,
            "baseline_rule": BASELINE_RULES,
            "discrete_role": ROLES,
        }
        if f.type in ("bool", bool):  # --name / --no-name: a setting may default to on
            option = click.option(
                f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=True,
                help=f.metadata["help"],
            )  # fmt: skip
        elif isinstance(f.default, tuple):  # a list of names: --targets a,b
            option = click.option(
                flag, f.name, default=",".join(f.default), callback=_names,
                metavar="NAME,...", help=f.metadata["help"],
            )  # fmt: skip
        else:
            kind: Any = click.Choice(choices[f.name]) if f.name in choices else None
            if kind is None and f.default is not None:
                kind = type(f.default)
            option = click.option(
                flag, f.name, type=kind, default=f.default, show_default=True,
                help=f.metadata["help"],
            )  # fmt: skip
        command = option(command)
    return command


@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--out", type=click.Path(path_type=Path), help="Output .onnx (default: models/<data>.onnx)."
)
@_data_options
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="default",
    show_default=True,
    help="Defaults for a kind of recording (small: a few hundred rows); explicit options win.",
)
@_setting_options
@click.option("--name", help="Model name (default: output file stem).")
@click.option("--model-version", default="1", show_default=True)
@click.option("--report/--no-report", default=True, help="Write plots beside the model.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def train(
    data: Path,
    out: Path | None,
    time_column: str | None,
    channels: str | None,
    label_columns: tuple[str, ...],
    period: float | None,
    max_gap: float | None,
    preset: str,
    name: str | None,
    model_version: str,
    report: bool,
    as_json: bool,
    **settings: Any,
) -> None:
    """Train an autoencoder on normal data in DATA (CSV) and export one ONNX file."""
    from click.core import ParameterSource

    from training.config import options_for
    from training.pipeline import train as run_training
    from training.role import RoleError

    table = _load(data, time_column, channels, label_columns, period, max_gap)
    out = out or Path("models") / f"{data.stem}.onnx"
    ctx = click.get_current_context()
    given = {k for k in ctx.params if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    if settings["variant"] != "denoising" and not {"noise", "noise_level"} & given:
        settings["noise"] = "none"  # the noise default belongs to the denoising variant
        given.add("noise")
    settings["false_alarms_per_day"] = settings["false_alarms_per_day"] or None
    # The preset's values, except those given on the command line.
    from_preset = set(PRESETS[preset].values) - given
    try:
        opts = options_for(
            preset,
            len(table.channels),
            **{k: v for k, v in settings.items() if k not in from_preset},
            progress=not as_json,
            name=name or out.stem,
            version=model_version,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    # This command prints the warnings and the file written itself: the pipeline's log lines
    # would say each twice.
    pipeline_log = logging.getLogger("training.pipeline")
    level = pipeline_log.level
    pipeline_log.setLevel(logging.ERROR)
    try:
        result = run_training(table, opts, out)
    except RoleError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        pipeline_log.setLevel(level)
    report_path = None
    if report:
        from training.report import write_report

        report_path = write_report(result, out.with_suffix(".report"))
    m = result.manifest
    summary = {
        "path": str(out),
        "seconds": round(result.seconds, 2),
        "epochs": result.fit.epochs,
        "enter_threshold": m.alarm.enter_threshold,
        "exit_threshold": m.alarm.exit_threshold,
        "rule": m.calibration.rule,
        "false_alarms_per_day": m.calibration.false_alarms_per_day,
        "parity_max_rel_error": m.validation.parity_max_rel_error,
        "report": str(report_path) if report_path else None,
        "notes": result.notes + m.calibration.warnings,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"wrote {out} in {result.seconds:.1f} s ({result.fit.epochs} epochs); thresholds "
        f"enter {m.alarm.enter_threshold:.4g} / exit {m.alarm.exit_threshold:.4g} "
        f"(rule {m.calibration.rule}); parity {m.validation.parity_max_rel_error:.1e}"
    )
    click.echo(f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    for note in result.notes:
        click.echo(f"note: {note}")
    for warning in m.calibration.warnings:
        click.echo(f"warning: {warning}")
    if report_path:
        click.echo(f"report: {report_path}")


@click.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@_data_options
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Daemon config: apply its alarm-policy overrides.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write decisions.csv (timestamp,score,alarm) and a plot here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print metrics as JSON.")
def evaluate(
    model_path,
    data,
    time_column,
    channels,
    label_columns,
    period,
    max_gap,  # type: ignore[no-untyped-def]
    config_path,
    out_dir,
    as_json,
):
    """Score labelled DATA with MODEL through the daemon's alarm logic; print F1/FAR/MAR."""
    from training.evaluate import evaluate_table, write_outputs

    model = load_model_or_exit(model_path)
    m = model.manifest
    if not channels:
        channels = ",".join(m.channels)
    table = _load(data, time_column, channels, label_columns, period or m.sample_period_s, max_gap)
    from daemon.detector import Stages

    policy, stages = m.alarm, Stages.of(m)
    if config_path is not None:
        from daemon.config import ConfigError, apply_alarm_overrides, load_config

        try:
            alarm = load_config(config_path).alarm
            policy = apply_alarm_overrides(policy, alarm)
        except ConfigError as exc:
            refuse(exc)
        stages = stages.overridden(alarm)
    label = label_columns[0] if label_columns else "anomaly"
    if label not in table.labels:
        click.echo(
            f"error: {data}: no label column {label!r} (found {sorted(table.labels) or 'none'}); "
            "pass --label-column",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    result = evaluate_table(model, table, policy, label, stages)
    if out_dir is not None:
        write_outputs(result, table, out_dir, policy)
    if as_json:
        click.echo(json.dumps(result.metrics, indent=2))
    else:
        click.echo(result.summary())


@click.command()
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a CSV file (timestamp, channels, anomaly).",
)
@click.option("--broker", help="Publish live to this broker instead (mqtt://host:port).")
@click.option("--rows", default=20_000, show_default=True, help="CSV mode: rows to write.")
@click.option(
    "--runs",
    default=1,
    show_default=True,
    help="CSV mode: split the rows over this many runs (seeds SEED..), 1 h apart.",
)
@click.option("--streams", default=1, show_default=True, help="MQTT mode: streams sim-0..N-1.")
@click.option(
    "--rate",
    default=1.0,
    show_default=True,
    help="MQTT mode: readings per second per stream (each advances one period).",
)
@click.option("--duration", default=60.0, show_default=True, help="MQTT mode: seconds to run.")
@click.option("--seed", default=1, show_default=True)
@click.option("--period", default=1.0, show_default=True, help="Sample period in seconds.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    help="[STREAM:]KIND[@START_S[+DURATION_S]], or 'all'; repeatable.",
)
def simulate(csv_path, broker, rows, runs, streams, rate, duration, seed, period, faults):  # type: ignore[no-untyped-def]
    """Simulate a pump (8 correlated sensors) with optional faults, to CSV or to MQTT."""
    from dataclasses import replace

    from training.fault import parse_fault, schedule_all

    if (csv_path is None) == (broker is None):
        raise click.UsageError("give exactly one of --csv FILE or --broker URL")
    total_s = rows * period if csv_path else duration
    specs = []
    try:
        for text in faults:
            stream, _, kind = text.rpartition(":")
            if kind == "all":
                specs += [replace(s, stream=stream or None) for s in schedule_all(total_s)]
            else:
                specs.append(parse_fault(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from exc
    if broker is not None:
        from training.publisher import PublishPlan, publish

        plan = PublishPlan(broker, streams, rate, duration, period, seed, faults=tuple(specs))
        try:
            counts = publish(plan)
        except (OSError, ValueError, ConnectionError) as exc:
            click.echo(f"error: {broker}: {exc}", err=True)
            sys.exit(1)
        click.echo(
            f"published {counts['sent']} readings to {streams} streams "
            f"({counts['acked']} acknowledged, {counts['anomalous']} in faults)"
        )
        return
    from training.simulator import simulate_runs, write_csv

    data = simulate_runs(rows, seed, runs, specs, period_s=period)
    write_csv(csv_path, data)
    click.echo(
        f"wrote {csv_path}: {rows} rows x {len(data.channels)} channels, "
        f"{int(data.anomaly.sum())} anomalous rows from {len(data.faults)} faults"
    )


def _timestamp(value: str | None) -> float | None:
    """Unix seconds or RFC 3339 (`2026-03-01T00:00:00Z`)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    from datetime import datetime

    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is neither unix seconds nor RFC 3339") from exc
    if parsed.tzinfo is None:
        raise click.BadParameter(f"{value!r} has no time zone; add Z or +00:00")
    return parsed.timestamp()


@click.command()
@click.option(
    "--store",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The daemon's recording (state_dir/recording.sqlite3, or a copy).",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    help="The champion: the model being served (default: model.path of --config).",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Challenger file."
)
@click.option("--promote", is_flag=True, help="Replace the live model if the challenger wins.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The daemon's config: live model path, sha256 pin and alarm overrides.",
)
@click.option("--streams", help="Comma-separated streams to use (default: every recorded one).")
@click.option("--days", default=7.0, show_default=True, help="Most recent days of data to use.")
@click.option(
    "--normal-since",
    help="Readings from this time on are normal even where the daemon was in alarm "
    "(a new set point you have checked). Unix seconds or RFC 3339.",
)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The daemon's event journal with operators' labels (default: events.sqlite3 beside "
    "--store, if there is one). false_alarm periods are kept as normal data, confirmed ones "
    "left out; the report shows both models on them.",
)
@click.option("--no-labels", is_flag=True, help="Ignore the labels.")
@click.option(
    "--exclude-margin",
    type=float,
    help="Seconds left out around alarm, muted and stale periods (default 2 windows + 60 s).",
)
@click.option("--eval-fraction", default=0.2, show_default=True, help="Most recent normal share.")
@click.option(
    "--hidden",
    default=setting_field("hidden").default,
    show_default=True,
    help="Hidden units (as oteo train).",
)
@click.option(
    "--epochs",
    default=setting_field("max_epochs").default,
    show_default=True,
    help="Most epochs (early stopping).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--fault-trials", default=20, show_default=True, help="Injected faults per kind.")
@click.option(
    "--tolerance", default=0.1, show_default=True, help="Allowed drop of a detection rate."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def retrain(
    store,
    model_path,
    out,
    promote,
    config_path,
    streams,
    days,  # type: ignore[no-untyped-def]
    normal_since,
    labels_path,
    no_labels,
    exclude_margin,
    eval_fraction,
    hidden,
    epochs,
    seed,
    fault_trials,
    tolerance,
    as_json,
):
    """Train a challenger on recorded data; promote it only if it is not worse than the champion.

    Writes OUT and OUT's report (`<out>.retrain.json`: decision, reasons, both models' false
    alarms per day and detection rate per fault kind).
    """
    from daemon.config import ConfigError, load_config
    from daemon.journal import JournalError
    from daemon.model import ModelFileError
    from daemon.recording import RecordingError
    from training.data import DataError
    from training.retrain import RetrainError, RetrainOptions, write_report
    from training.retrain import promote as promote_model
    from training.retrain import retrain as run_retrain

    cfg = None
    if config_path is not None:
        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            click.echo(f"error: {config_path}: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    if model_path is None:
        if cfg is None:
            raise click.UsageError("pass --model, or --config with model.path")
        model_path = cfg.model.path
    # The live file is the one the daemon serves: its config's model.path, else --model.
    live = cfg.model.path if cfg is not None else model_path
    opts = RetrainOptions(
        streams=_csv_list(streams),
        days=days if days > 0 else None,
        normal_since=_timestamp(normal_since),
        exclude_margin_s=exclude_margin,
        eval_fraction=eval_fraction,
        hidden=hidden,
        epochs=epochs,
        seed=seed,
        fault_trials=fault_trials,
        tolerance=tolerance,
        alarm=cfg.alarm if cfg is not None else None,
        labels=labels_path,
        use_labels=not no_labels,
    )
    try:
        outcome = run_retrain(store, model_path, out, opts)
    except (RetrainError, RecordingError, DataError, ModelFileError, JournalError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if promote:
        promote_model(outcome, out, live, cfg.model.sha256 if cfg is not None else None)
    else:
        outcome.promotion = "not asked (--promote)"
    report = write_report(outcome, out.with_name(out.stem + ".retrain.json"))
    if outcome.promoted:
        write_report(outcome, live.with_name(live.stem + ".retrain.json"))
    if as_json:
        click.echo(json.dumps(outcome.as_dict(), indent=2))
        if promote and outcome.promotion and outcome.promotion.startswith("failed"):
            sys.exit(1)
        return
    champ, chall = outcome.champion, outcome.challenger
    click.echo(f"decision: {outcome.decision} ({'; '.join(outcome.reasons)})")
    click.echo(
        f"false alarms/day: champion {champ.false_alarms_per_day:.2f}, "
        f"challenger {chall.false_alarms_per_day:.2f} on {outcome.data['eval_hours']} h"
    )
    for kind, rate in champ.detection_rate.items():
        new = chall.detection_rate[kind]
        click.echo(f"detected {kind}: champion {rate:.2f}, challenger {new:.2f}")
    a, b = champ.labelled, chall.labelled
    if a.false_alarm_periods:
        click.echo(
            f"alarms on the {a.false_alarm_periods} periods labelled false_alarm: champion "
            f"{a.false_alarm_events} ({a.false_alarm_share:.0%} of the time), challenger "
            f"{b.false_alarm_events} ({b.false_alarm_share:.0%})"
        )
    if a.confirmed_periods:
        click.echo(
            f"confirmed episodes detected (of {a.confirmed_periods}): champion "
            f"{a.confirmed_detected}, challenger {b.confirmed_detected}"
        )
    click.echo(f"promotion: {outcome.promotion}")
    click.echo(f"report: {report}")
    if promote and outcome.promotion and outcome.promotion.startswith("failed"):
        sys.exit(1)
