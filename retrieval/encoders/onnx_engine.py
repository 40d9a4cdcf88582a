"""ONNX Runtime inference for the encoder towers: sessions, the runner, and the export cache's files.

- :class:`OnnxTower` runs one exported tower (``head(backbone(x))``, see :mod:`retrieval.encoders.onnx_export`) in an
  ONNX Runtime session; tokenised text runs in groups of similar length (:func:`length_groups`).
- :func:`make_session`: intra-op threads = the usable cores (or the spec's ``threads``), inter-op 1, all graph
  optimisations, no spinning; the CUDA provider where asked for and installed, else the CPU (:func:`onnx_providers`).
- :func:`cache_dir` / :func:`cached_ok`: exported files live in ``cache_root()/onnx`` beside a JSON sidecar holding
  their SHA-256; a file that does not match is exported again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from retrieval.checksums import file_sha256
from retrieval.encoders.cpu import usable_cores
from retrieval.errors import EncoderUnavailable
from retrieval.paths import cache_root

log = logging.getLogger(__name__)

TowerKind = Literal["image", "text"]
OnnxPrecision = Literal["fp32", "int8"]


class ExportFailed(EncoderUnavailable):
    """A tower could not be exported to ONNX, or the export does not reproduce torch's output."""


def onnx_available() -> bool:
    """Whether ONNX Runtime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSignature:
    """How a backbone's input maps to graph inputs: ``names`` of the tensor inputs, ``keyed`` whether the backbone
    takes a dict (else the one tensor itself), ``constants`` the dict's non-tensor entries."""

    names: tuple[str, ...]
    keyed: bool
    constants: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, inputs: torch.Tensor | Mapping[str, Any], tensor_name: str) -> InputSignature:
        if isinstance(inputs, torch.Tensor):
            return cls((tensor_name,), keyed=False)
        if isinstance(inputs, Mapping):
            names = tuple(k for k, v in inputs.items() if isinstance(v, torch.Tensor))
            constants = tuple((k, v) for k, v in inputs.items() if not isinstance(v, torch.Tensor))
            if not names:
                raise ExportFailed("the backbone's input dict holds no tensor")
            return cls(names, keyed=True, constants=constants)
        raise ExportFailed(f"cannot export a backbone whose input is a {type(inputs).__name__}")

    def tensors(self, inputs: torch.Tensor | Mapping[str, Any]) -> list[Any]:
        """The tensors to feed, in graph-input order; the constants must match the exported ones."""
        if not self.keyed:
            assert isinstance(inputs, torch.Tensor)
            return [inputs]
        assert isinstance(inputs, Mapping)
        for key, value in self.constants:
            if inputs.get(key) != value:
                raise ExportFailed(f"input {key!r} is {inputs.get(key)!r}; the graph was exported with {value!r}")
        return [inputs[name] for name in self.names]


# ----------------------------------------------------------------------------------------------------------------
# Sessions
# ----------------------------------------------------------------------------------------------------------------


def onnx_providers(device_type: str, available: Sequence[str]) -> tuple[list[str], str | None]:
    """Execution providers for a device: CUDA (then CPU) on ``cuda`` where ONNX Runtime has the CUDA provider,
    else CPU. The second value says why CUDA was asked for and not used (None when nothing fell back)."""
    if device_type == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
        return ["CPUExecutionProvider"], ("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu); "
                                          "running the ONNX graph on the CPU")
    return ["CPUExecutionProvider"], None


def make_session(path: Path, device_type: str = "cpu", threads: int | None = None) -> Any:
    """An ONNX Runtime session: intra-op threads = ``threads`` or the usable cores, inter-op 1, all graph
    optimisations, no spinning of idle worker threads (they would steal a shared machine's cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or usable_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    providers, note = onnx_providers(device_type, ort.get_available_providers())
    if note:
        log.warning(note)
    return ort.InferenceSession(str(path), opts, providers=providers)


def session_factory(path: Path, device_type: str = "cpu", threads: int | None = None) -> Callable[[int | None], Any]:
    """``new(n)`` -> another session of ``path`` with ``n`` intra-op threads (None: ``threads``)."""
    return lambda n: make_session(path, device_type, n if n is not None else threads)


class OnnxTower:
    """One exported tower in ONNX Runtime: backbone inputs -> ``(n, d)`` float32 (not normalised). Thread-safe;
    the GIL is released while a session computes. One session serialises concurrent calls (measured: two threads
    on one session 1.06x, on two sessions 1.45x on a busy 2-core machine), so callers that run several batches at
    once ask for as many sessions with :meth:`ensure_sessions`.

    ``new_session(threads)`` opens another session of the same graph (``threads`` None: the tower's own count).
    With :meth:`ensure_lone_session`, a call that starts while no other call of this tower runs takes a session
    with more intra-op threads (a server's lone query gets every core; under load each batch keeps its own)."""

    engine = "onnx"

    def __init__(self, session: Any, signature: InputSignature, precision: OnnxPrecision, path: Path,
                 new_session: Callable[[int | None], Any] | None = None):
        self.session = session
        self.signature = signature
        self.precision = precision
        self.path = path
        self.providers: list[str] = list(session.get_providers())
        self._new_session = new_session
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle.put(session)
        self._sessions = 1
        self._grow = threading.Lock()
        #: the session a call running alone takes (None: every call takes one of the pool's)
        self._lone: Any = None
        self.lone_threads: int | None = None
        self._running = 0
        self._count = threading.Lock()
        #: calls that ran on the lone session (tests and benchmarks read it)
        self.lone_calls = 0

    def ensure_sessions(self, n: int) -> int:
        """At least ``n`` sessions of this graph (extra ones cost its size in memory each); returns how many."""
        with self._grow:
            while self._new_session is not None and self._sessions < n:
                self._idle.put(self._new_session(None))
                self._sessions += 1
            return self._sessions

    def ensure_lone_session(self, threads: int) -> bool:
        """Open one more session with ``threads`` intra-op threads, taken by a call that starts while no other call
        of this tower runs. Measured on 2 cores (AMD EPYC Zen 4, MiniLM, one short query): 5.4 ms on a 1-thread
        session, 4.4 ms on a 2-thread one; the service's p50 at concurrency 1 went 8.4 -> 7.7 ms with no change at
        64. Letting this session's threads spin gave 6.6-7.0 ms at 1 but 12 % fewer queries/s at 64, and 16 % fewer
        at 8 even when only one-row calls took it (spinning stopped after each run: 7.8 ms, 5 % fewer at 64): not
        done.
        Returns False when this tower cannot open sessions or runs on a GPU (where threads do not apply)."""
        with self._grow:
            if self._new_session is None or self.providers[:1] != ["CPUExecutionProvider"]:
                return False
            if self._lone is None or self.lone_threads != threads:
                self._lone = self._new_session(threads)
                self.lone_threads = threads
            return True

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self._count:
            lone = self._lone if self._running == 0 else None  # only one call can find no other running
            self._running += 1
        session = lone if lone is not None else self._idle.get()
        try:
            if lone is not None:
                self.lone_calls += 1
            return np.asarray(session.run(None, feeds)[0], dtype=np.float32)
        finally:
            with self._count:
                self._running -= 1
            if lone is None:
                self._idle.put(session)

    def __call__(self, inputs: torch.Tensor | np.ndarray | Mapping[str, Any]) -> np.ndarray:
        if isinstance(inputs, np.ndarray):
            feeds = {self.signature.names[0]: np.ascontiguousarray(inputs, dtype=np.float32)}
        else:
            tensors = self.signature.tensors(inputs)
            feeds = {n: _to_numpy(t) for n, t in zip(self.signature.names, tensors, strict=True)}
        mask = feeds.get("attention_mask")
        if mask is not None and mask.ndim == 2 and mask.shape[0] > 1:
            return self._run_by_length(feeds, mask.sum(1), mask.shape)
        return self._run(feeds)

    def _run_by_length(self, feeds: dict[str, np.ndarray], lengths: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Tokenised text padded to the longest in the batch wastes ~45% of the work on Flickr8k captions at batch
        32: run groups of similar length instead, each cut to its own longest (exact: padding is masked)."""
        out: np.ndarray | None = None
        for rows in length_groups(lengths):
            width = int(lengths[rows].max())
            part = {k: np.ascontiguousarray(v[rows, :width] if v.shape == shape else v[rows]) for k, v in feeds.items()}
            emb = self._run(part)
            if out is None:
                out = np.empty((len(lengths), emb.shape[1]), np.float32)
            out[rows] = emb
        assert out is not None
        return out


def length_groups(lengths: np.ndarray, max_waste: float = 0.2, max_group: int = 64) -> list[np.ndarray]:
    """Row indices grouped by similar length (sorted): a group grows while its padding stays under ``max_waste``
    of its cells and it has fewer than ``max_group`` rows."""
    order = np.argsort(lengths, kind="stable")
    groups: list[list[int]] = []
    total = 0
    for i in order:
        n = int(lengths[i])
        if groups:
            g = groups[-1]
            if len(g) < max_group and (len(g) + 1) * n * (1 - max_waste) <= total + n:
                g.append(int(i))
                total += n
                continue
        groups.append([int(i)])
        total = n
    return [np.asarray(g) for g in groups]


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t if t.dtype.kind in "iu" else t.astype(np.float32, copy=False))
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()
    return np.ascontiguousarray(t.numpy())


# ----------------------------------------------------------------------------------------------------------------
# The cache's files
# ----------------------------------------------------------------------------------------------------------------

_fallback_dir: Path | None = None


def cache_dir() -> Path:
    """``cache_root()/onnx``; where that cannot be written (a read-only home in a container), a temporary folder
    for this process (exports are then redone by every process, and a warning says so)."""
    global _fallback_dir
    folder = cache_root() / "onnx"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    if _fallback_dir is None:
        _fallback_dir = Path(tempfile.mkdtemp(prefix="retrieval-onnx-"))
        log.warning("cannot write the ONNX cache %s; exporting into %s for this process only (set RETRIEVAL_CACHE "
                    "to a writable folder)", folder, _fallback_dir)
    return _fallback_dir


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def cached_ok(path: Path) -> bool:
    """The cache file exists and matches the SHA-256 its sidecar recorded (written after the file)."""
    side = sidecar_path(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        return bool(meta.get("sha256") == file_sha256(path))
    except (OSError, ValueError):
        return False


