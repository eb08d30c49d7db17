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


class ExportError(RuntimeError):
    """The exported graph is not faithful to the torch model or breaks the contract."""


class ScoringGraph(nn.Module):
    """Raw windows in; score, channel_score, reconstruction (raw units) and code out."""

    def __init__(self, model: Autoencoder, mean: np.ndarray, scale: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = (window - self.mean) / self.scale
        out = self.model(z)
        err = (out.reconstruction - z) ** 2
        channel_score = err.mean(1)
        score = channel_score.mean(1)
        reconstruction = out.reconstruction * self.scale + self.mean
        return score, channel_score, reconstruction, out.code


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


@torch.no_grad()
def parity(graph: ScoringGraph, session_outputs: list[np.ndarray], windows: np.ndarray) -> float:
    """Largest relative difference between torch and onnxruntime outputs on the same windows.

    `score` is compared element by element (thresholds act on each score); the other outputs
    relative to their largest magnitude, since entries near zero (a code unit, a quiet channel)
    differ by float32 noise that means nothing at the scale of the output.
    """
    graph.eval()
    expected = graph(torch.from_numpy(windows))
    worst = 0.0
    for name, ref, got in zip(OUTPUTS, expected, session_outputs, strict=True):
        ref_np = ref.numpy().astype(np.float64)
        got_np = np.asarray(got, dtype=np.float64)
        if ref_np.shape != got_np.shape:
            raise ExportError(f"output {name}: shape {got_np.shape} vs torch {ref_np.shape}")
        diff = np.abs(got_np - ref_np)
        if name == "score":
            err = float(np.max(diff / np.maximum(np.abs(ref_np), 1e-12)))
        else:
            err = float(diff.max() / max(float(np.abs(ref_np).max()), 1e-12))
        worst = max(worst, err)
    return worst
