"""Export a trained autoencoder as the oteo ONNX contract, and prove the export is faithful.

The exported graph takes raw sensor windows and does the whole scoring computation inside
(standardise, reconstruct, per-channel and total error, de-standardise), so every runtime gets the
same numbers. See shared notes on export: single file, eval mode, no random ops, stripped
per-node metadata, a parity check with a relative tolerance.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from daemon.manifest import METADATA_KEY, Manifest
from daemon.model import INPUT, OUTPUTS
from training.model import Autoencoder

OPSET = 20
# Measured here: up to 2.5e-6 relative (GRU) on scores; 2e-5 leaves room for other machines
# while still catching a wrong graph (those differ by orders of magnitude).
PARITY_RTOL = 2e-5
# Scores are mean squared errors in standard deviations: they are compared as the RMS error they
# stand for, which torch and onnxruntime must agree on to PARITY_RTOL of itself or of one standard
# deviation, whichever is larger. Both round the reconstruction to ~1e-7 sd; a score's own
# relative difference is that rounding over its RMS error, which grows without bound as a model
# fits better: a channel constant in training (NASA T-5, score 9.3e-9) differed by 2.2e-5
# relative at batch 1, a smooth one rebuilt to 0.009 sd (G-6, score 8.6e-5) by 3.0e-5, each
# 1e-7 sd or less in RMS terms. A wrong graph (weights 0.1 % off) moves the RMS by ~1e-3 sd.
RMS_FLOOR = 1.0


class ExportError(RuntimeError):
    """The exported graph is not faithful to the torch model or breaks the contract."""


class ScoringGraph(nn.Module):
    """Raw windows in; score, channel_score, reconstruction (raw units) and code out.

    With channel roles (training/role.py) the graph feeds the model the target and context
    channels, scores the targets only, gives 0 as the channel_score of the others and their input
    as their reconstruction. Without roles it is the plain graph, op for op.
    """

    def __init__(
        self,
        model: Autoencoder,
        mean: np.ndarray,
        scale: np.ndarray,
        roles: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        channels = len(mean)
        roles = list(roles) if roles else ["target"] * channels
        if len(roles) != channels:
            raise ExportError(f"{len(roles)} roles for {channels} channels")
        self.plain = all(r == "target" for r in roles)
        self.steps = model.cfg.predict_steps
        if self.plain:
            return
        inputs = [i for i, r in enumerate(roles) if r != "ignore"]
        targets = [i for i, r in enumerate(roles) if r == "target"]
        if len(inputs) != model.cfg.channels or len(targets) != model.cfg.outputs:
            raise ExportError(
                f"roles give {len(inputs)} inputs and {len(targets)} targets; the model has "
                f"{model.cfg.channels} and {model.cfg.outputs}"
            )
        # place[t, c] = 1 where target t is channel c: puts [.., T] results into [.., C] columns
        # exactly (x * 1 plus zeros), a MatMul every runtime has.
        place = torch.zeros(len(targets), channels)
        place[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
        self.register_buffer("inputs", torch.tensor(inputs, dtype=torch.int64))
        self.register_buffer("targets", torch.tensor(targets, dtype=torch.int64))
        self.register_buffer("place", place)
        self.register_buffer("passthrough", 1.0 - place.sum(0))

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = (window - self.mean) / self.scale
        if self.plain:
            out = self.model(z)
            err = (out.reconstruction - z) ** 2
        else:
            out = self.model(torch.index_select(z, 2, self.inputs))
            err = (out.reconstruction - torch.index_select(z, 2, self.targets)) ** 2
        if self.steps:
            err = err[:, -self.steps :]  # the predicted steps alone are scored
        target_score = err.mean(1)
        score = target_score.mean(1)
        if self.plain:
            reconstruction = out.reconstruction * self.scale + self.mean
            return score, target_score, reconstruction, out.code
        t_scale = torch.index_select(self.scale, 0, self.targets)
        t_mean = torch.index_select(self.mean, 0, self.targets)
        rebuilt = out.reconstruction * t_scale + t_mean
        reconstruction = window * self.passthrough + rebuilt @ self.place
        return score, target_score @ self.place, reconstruction, out.code


def to_onnx(graph: ScoringGraph, window: int, channels: int) -> onnx.ModelProto:
    """Export with the dynamo exporter to one in-memory model with a dynamic batch axis."""
    graph.eval()
    example = torch.zeros(2, window, channels)  # batch >= 2, or the exporter may fix it at 1
    batch = torch.export.Dim("batch", min=1)
    # The exporter prints progress lines and warnings that mean nothing to a user; errors
    # still raise.
    with (
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
        _quiet("torch.onnx", "onnxscript", "onnx_ir"),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={"window": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    # Per-node metadata holds stack traces with absolute paths (10-30 % of the file) and makes
    # two exports of the same weights differ; outputs are unchanged without it.
    for node in proto.graph.node:
        del node.metadata_props[:]
    for fn in proto.functions:
        for node in fn.node:
            del node.metadata_props[:]
    del proto.metadata_props[:]
    _check_contract(proto)
    return proto


@contextlib.contextmanager
def _quiet(*names: str):  # type: ignore[no-untyped-def]
    """Raise the given loggers to ERROR for the duration (exporter chatter)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_contract(proto: onnx.ModelProto) -> None:
    ops = {n.op_type for n in proto.graph.node} | {
        n.op_type for f in proto.functions for n in f.node
    }
    random_ops = sorted(op for op in ops if "Random" in op)
    if random_ops:
        raise ExportError(f"exported graph contains random ops {random_ops}: was it in train mode?")
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(
                f"initializer {init.name} is stored externally; export must be one file"
            )
    names = [o.name for o in proto.graph.output]
    if names != list(OUTPUTS) or [i.name for i in proto.graph.input] != [INPUT]:
        raise ExportError(
            f"graph signature is {names}, expected input {INPUT} and outputs {OUTPUTS}"
        )


def with_manifest(proto: onnx.ModelProto, manifest: Manifest) -> bytes:
    """Serialise the model with the manifest in metadata_props (other props kept)."""
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = manifest.to_json()
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "oteo"
    return proto.SerializeToString()


def check_parity(graph: ScoringGraph, session: Any, probe: np.ndarray) -> float:
    """Worst relative difference torch vs onnxruntime (ExportError above PARITY_RTOL).

    Compared on normal windows and on the same windows with one standard deviation of noise
    added to every channel, at batch 1 and 64 (onnxruntime's kernels differ between the two).
    Normal windows of a channel that was constant in training score almost 0, where float32 noise
    is all there is to compare; the noisy ones score O(1) for every channel, so a wrong graph
    (weights, standardisation, roles, masking) shows on them at any rate.
    """
    scale = graph.scale.numpy()
    noisy = probe + np.random.default_rng(0).standard_normal(probe.shape).astype(np.float32) * scale
    worst = 0.0
    for windows in (probe, noisy.astype(np.float32)):
        for batch in (windows[:1], windows[:64]):
            outputs = session.run(list(OUTPUTS), {INPUT: batch})
            worst = max(worst, parity(graph, outputs, batch))
    if worst > PARITY_RTOL:
        raise ExportError(f"torch vs onnxruntime differ by {worst:.2e} relative (> {PARITY_RTOL})")
    return worst


@torch.no_grad()
def parity(graph: ScoringGraph, session_outputs: list[np.ndarray], windows: np.ndarray) -> float:
    """Largest relative difference between torch and onnxruntime outputs on the same windows.

    `score` and `channel_score` are compared element by element (thresholds act on each score)
    as RMS errors (see RMS_FLOOR); the other outputs relative to their largest magnitude, since
    entries near zero (a code unit) differ by float32 noise that means nothing at the scale of
    the output.
    """
    graph.eval()
    expected = graph(torch.from_numpy(windows))
    worst = 0.0
    for name, ref, got in zip(OUTPUTS, expected, session_outputs, strict=True):
        worst = max(worst, difference(name, ref.numpy(), np.asarray(got)))
    return worst


def difference(name: str, ref: np.ndarray, got: np.ndarray) -> float:
    """Relative difference of one output, as `parity` measures it."""
    ref_np, got_np = ref.astype(np.float64), got.astype(np.float64)
    if ref_np.shape != got_np.shape:
        raise ExportError(f"output {name}: shape {got_np.shape} vs torch {ref_np.shape}")
    if name in ("score", "channel_score"):
        rms_ref, rms_got = np.sqrt(np.maximum(ref_np, 0.0)), np.sqrt(np.maximum(got_np, 0.0))
        return float(np.max(np.abs(rms_got - rms_ref) / np.maximum(rms_ref, RMS_FLOOR)))
    diff = np.abs(got_np - ref_np)
    return float(diff.max() / max(float(np.abs(ref_np).max()), 1e-12))
