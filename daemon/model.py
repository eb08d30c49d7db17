"""Load, validate and run an oteo ONNX model file with onnxruntime (no torch).

A model file is refused with one line naming what is wrong: not ONNX or truncated, manifest
missing or invalid, schema version unknown, inputs/outputs or shapes not as the manifest says,
sha256 not the pinned one, non-finite output on the warm-up run.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from daemon.manifest import METADATA_KEY, Manifest, ManifestError

log = logging.getLogger(__name__)

INPUT = "window"
OUTPUTS = ("score", "channel_score", "reconstruction", "code")


class ModelFileError(ValueError):
    """The model file cannot be used; the message is one line naming the file and the problem."""


class InferenceError(RuntimeError):
    """onnxruntime failed on a batch that passed our own shape checks."""


@dataclass(frozen=True, slots=True)
class ScoreBatch:
    """All outputs of one session run, row i belonging to window i."""

    score: np.ndarray  # [B]
    channel_score: np.ndarray  # [B, C]
    reconstruction: np.ndarray  # [B, W, C] raw units
    code: np.ndarray  # [B, K]


class Scorer(Protocol):
    """What the engine needs of a model: its manifest, its identity and a batch run.

    `Model` is the real one; engine tests use small stand-ins with a hand-made manifest.
    """

    manifest: Manifest
    sha256: str
    window: int
    channels: int

    def run(self, windows: np.ndarray) -> ScoreBatch:
        """All outputs for raw-unit windows [B, window, channels]."""
        ...


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Options fit for a small box: few threads and no busy-waiting between runs."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning keeps a core busy after each run: wasteful on an edge box that waits for MQTT.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class Model:
    """A validated model file: its manifest, its sha256 and an onnxruntime session."""

    def __init__(self, path: Path, sha256: str, manifest: Manifest, session: ort.InferenceSession):
        self.path = path
        self.sha256 = sha256
        self.manifest = manifest
        self.session = session
        self.window = manifest.window
        self.channels = len(manifest.channels)

    @classmethod
    def load(
        cls, path: str | Path, *, threads: int = 1, expected_sha256: str | None = None
    ) -> Model:
        """Read, check and warm up a model file; raise ModelFileError with one line if unusable."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"{path}: cannot read model file ({exc.strerror})") from exc
        return cls.from_bytes(data, path, threads=threads, expected_sha256=expected_sha256)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        path: Path,
        *,
        threads: int = 1,
        expected_sha256: str | None = None,
    ) -> Model:
        sha256 = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256.lower():
            raise ModelFileError(
                f"{path}: sha256 {sha256} does not match the pinned {expected_sha256}; "
                "update model.sha256 in the config or restore the pinned file"
            )
        try:
            session = ort.InferenceSession(
                data, sess_options=session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several private exception types
            raise ModelFileError(
                f"{path}: not a readable ONNX model (truncated or corrupt?): "
                f"{str(exc).splitlines()[0][:200]}"
            ) from exc
        meta = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ModelFileError(
                f"{path}: no oteo manifest in the file's metadata; export it with `oteo train`"
            )
        try:
            manifest = Manifest.from_json(meta[METADATA_KEY])
        except ManifestError as exc:
            raise ModelFileError(f"{path}: {exc}") from exc
        _check_signature(session, manifest, path)
        model = cls(path, sha256, manifest, session)
        model._warm_up()
        return model

    def _warm_up(self) -> None:
        # The first run allocates buffers and plans the graph; doing it at load time keeps that
        # latency out of the first live window and proves the graph computes finite numbers.
        mean = np.asarray(self.manifest.channel_mean, dtype=np.float32)
        windows = np.broadcast_to(mean, (2, self.window, self.channels)).copy()
        try:
            out = self.run(windows)
        except InferenceError as exc:
            raise ModelFileError(f"{self.path}: warm-up run failed: {exc}") from exc
        for name in OUTPUTS:
            if not np.all(np.isfinite(getattr(out, name))):
                raise ModelFileError(
                    f"{self.path}: warm-up run produced non-finite '{name}'; the model is broken"
                )

    def check_windows(self, windows: np.ndarray) -> None:
        """Raise ValueError with one line if `windows` is not [B, window, channels]."""
        expected = (self.window, self.channels)
        if windows.ndim != 3 or windows.shape[1:] != expected or windows.shape[0] < 1:
            raise ValueError(
                f"windows must have shape [batch, {expected[0]}, {expected[1]}], "
                f"got {list(windows.shape)}"
            )

    def run(self, windows: np.ndarray) -> ScoreBatch:
        """Score a batch of raw-unit windows [B, W, C]; all outputs come from one session run."""
        self.check_windows(windows)
        x = np.ascontiguousarray(windows, dtype=np.float32)
        single = x.shape[0] == 1
        if single:
            # onnxruntime picks other kernels at batch 1 (up to 6e-7 relative difference); every
            # batch >= 2 is bit-identical, so a lone window is run as a pair: a window's score
            # never depends on how it was batched.
            x = np.concatenate([x, x])
        try:
            score, channel_score, recon, code = self.session.run(list(OUTPUTS), {INPUT: x})
        except Exception as exc:
            raise InferenceError(str(exc).splitlines()[0][:300]) from exc
        if single:
            return ScoreBatch(score[:1], channel_score[:1], recon[:1], code[:1])
        return ScoreBatch(score, channel_score, recon, code)


def _check_signature(session: ort.InferenceSession, manifest: Manifest, path: Path) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = [i.name for i in inputs]
        raise ModelFileError(f"{path}: expected one input named '{INPUT}', found {names}")
    shape = inputs[0].shape
    want = [manifest.window, len(manifest.channels)]
    if len(shape) != 3 or list(shape[1:]) != want or isinstance(shape[0], int):
        raise ModelFileError(
            f"{path}: input '{INPUT}' has shape {shape}; the manifest needs "
            f"[batch, {want[0]}, {want[1]}] with a dynamic batch axis"
        )
    outputs = {o.name: o.shape for o in session.get_outputs()}
    missing = [n for n in OUTPUTS if n not in outputs]
    if missing:
        raise ModelFileError(f"{path}: outputs {missing} are missing (found {sorted(outputs)})")
    expected_ranks = {"score": 1, "channel_score": 2, "reconstruction": 3, "code": 2}
    for name, rank in expected_ranks.items():
        if len(outputs[name]) != rank:
            raise ModelFileError(
                f"{path}: output '{name}' has rank {len(outputs[name])}, not {rank}"
            )
    code_dim = outputs["code"][1]
    if isinstance(code_dim, int) and code_dim != manifest.code_size:
        raise ModelFileError(
            f"{path}: output 'code' has {code_dim} units but the manifest says {manifest.code_size}"
        )
