"""ONNX Runtime inference for any encoder the factory builds: each tower is exported as ``head(backbone(inputs))``
from its torch modules (nothing backbone-specific), cached on disk, and run by an ONNX Runtime session.

- :class:`TowerModule` wraps a backbone and an optional head so that ``torch.onnx.export`` sees tensors only: a
  backbone that takes a tensor (pixels, open_clip tokens) gets one input; one that takes a dict (Hugging Face
  tokens) gets one input per tensor entry, and the dict's other entries (``"modality": "text"``) are kept as
  constants of the graph.
- :func:`load_tower` returns an :class:`OnnxTower` for a tower, exporting it on first use into
  ``cache_root()/onnx/`` (atomic write). The file name is keyed by the encoder identity, a fingerprint of the actual
  weights (so random-weight or fine-tuned modules never share a file), the exporter version, torch's version and
  the precision. A sidecar JSON records the file's SHA-256: a damaged or truncated cache file is exported again.
- Every fresh export is checked against torch on the example inputs (cosine >= :data:`MIN_EXPORT_COSINE`, and on a
  second batch size); a tower that does not export faithfully raises :class:`ExportFailed` and the caller keeps
  torch for it.
- ``int8``: ONNX Runtime dynamic quantisation of the fp32 graph's ``MatMul``/``Gemm`` weights (per channel), cached
  beside it. Convolutions stay fp32: dynamically quantised convolutions measured slower and far less accurate on
  EfficientNet-Lite0 (cosine 0.93 to fp32).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from retrieval.atomic import atomic_path, atomic_write_text
from retrieval.checksums import file_sha256
from retrieval.encoders.cpu import usable_cores
from retrieval.errors import EncoderUnavailable
from retrieval.paths import cache_root

log = logging.getLogger(__name__)

#: Bump when a change here alters what an exported file holds (wrapper, opset, quantisation settings).
EXPORTER_VERSION = 1
OPSET = 17
#: A fresh export must agree with torch at least this well (cosine per row) or it is not used.
MIN_EXPORT_COSINE = 0.9999
#: int8 is checked loosely, only to catch a broken graph (its quality delta is measured by ``make bench-cpu``).
MIN_INT8_COSINE = 0.9
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
# The exportable tower
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


class TowerModule(torch.nn.Module):
    """``head(backbone(x).float())`` (``head`` None: raw features) with tensor-only positional inputs."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module | None, signature: InputSignature):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.signature = signature

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.signature.keyed:
            x: Any = {**dict(self.signature.constants), **dict(zip(self.signature.names, tensors, strict=True))}
        else:
            x = tensors[0]
        out = self.backbone(x).float()
        return self.head(out) if self.head is not None else out


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): two modules share an export only when
    they compute the same function."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


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


class OnnxTower:
    """One exported tower in an ONNX Runtime session: backbone inputs -> ``(n, d)`` float32 (not normalised).
    Thread-safe (ONNX Runtime sessions accept concurrent ``run`` calls); releases the GIL while it computes."""

    engine = "onnx"

    def __init__(self, session: Any, signature: InputSignature, precision: OnnxPrecision, path: Path):
        self.session = session
        self.signature = signature
        self.precision = precision
        self.path = path
        self.providers: list[str] = list(session.get_providers())

    def __call__(self, inputs: torch.Tensor | np.ndarray | Mapping[str, Any]) -> np.ndarray:
        if isinstance(inputs, np.ndarray):
            feeds = {self.signature.names[0]: np.ascontiguousarray(inputs, dtype=np.float32)}
        else:
            tensors = self.signature.tensors(inputs)
            feeds = {n: _to_numpy(t) for n, t in zip(self.signature.names, tensors, strict=True)}
        mask = feeds.get("attention_mask")
        if mask is not None and mask.ndim == 2 and mask.shape[0] > 1:
            return self._run_by_length(feeds, mask.sum(1), mask.shape)
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)

    def _run_by_length(self, feeds: dict[str, np.ndarray], lengths: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Tokenised text padded to the longest in the batch wastes ~45% of the work on Flickr8k captions at batch
        32: run groups of similar length instead, each cut to its own longest (exact: padding is masked)."""
        out: np.ndarray | None = None
        for rows in length_groups(lengths):
            width = int(lengths[rows].max())
            part = {k: np.ascontiguousarray(v[rows, :width] if v.shape == shape else v[rows]) for k, v in feeds.items()}
            emb = np.asarray(self.session.run(None, part)[0], dtype=np.float32)
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
# Export and cache
# ----------------------------------------------------------------------------------------------------------------

_export_lock = threading.Lock()


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


def cache_key(identity: Mapping[str, Any], tower: TowerKind, fingerprint: str, signature: InputSignature,
              with_head: bool) -> str:
    """The file key: encoder identity, tower, weights, input signature, exporter and torch versions."""
    material = json.dumps({"identity": identity, "tower": tower, "weights": fingerprint, "head": with_head,
                           "inputs": [list(signature.names), signature.keyed, repr(signature.constants)],
                           "exporter": EXPORTER_VERSION, "opset": OPSET, "torch": torch.__version__},
                          sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def cached_ok(path: Path) -> bool:
    """The cache file exists and matches the SHA-256 its sidecar recorded (written after the file)."""
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        return bool(meta.get("sha256") == file_sha256(path))
    except (OSError, ValueError):
        return False


def _record(path: Path, **meta: Any) -> None:
    atomic_write_text(_sidecar(path), json.dumps({"sha256": file_sha256(path), **meta}, indent=2, default=str))


def _device_of(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _export(module: TowerModule, example: list[torch.Tensor], path: Path) -> None:
    device = _device_of(module)
    example = [t.to(device) for t in example]
    names = list(module.signature.names)
    dynamic: dict[str, dict[int, str]] = {"embedding": {0: "batch"}}
    for name, t in zip(names, example, strict=True):
        axes = {0: "batch"}
        if module.signature.keyed and t.dim() >= 2:
            axes[1] = "sequence"  # tokenizers pad each batch to its longest text
        dynamic[name] = axes
    # nn.MultiheadAttention's inference fast path is a fused op ONNX has no equivalent for: trace the plain path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(module, tuple(example), str(tmp), input_names=names, output_names=["embedding"],
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        except Exception as exc:  # the tracer raises many kinds for unsupported code
            raise ExportFailed(f"torch.onnx.export failed: {type(exc).__name__}: {short(exc)}") from exc
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def short(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception message, at most ``limit`` characters (tracer errors print whole graphs)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(dst) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                         weight_type=QuantType.QInt8)


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(1).min())


def _check(tower: OnnxTower, module: TowerModule, examples: Sequence[torch.Tensor | Mapping[str, Any]],
           minimum: float) -> None:
    for inputs in examples:
        device = _device_of(module)
        with torch.inference_mode():
            ref = module(*[t.to(device) for t in module.signature.tensors(inputs)]).float().cpu().numpy()
        got = tower(inputs)
        if got.shape != ref.shape:
            raise ExportFailed(f"the ONNX graph returns shape {got.shape}, torch {ref.shape}")
        cos = _cosine_min(ref, got)
        if not cos >= minimum:
            raise ExportFailed(f"the ONNX graph disagrees with torch (cosine {cos:.6f} < {minimum})")


def load_tower(
    kind: TowerKind,
    backbone: torch.nn.Module,
    head: torch.nn.Module | None,
    examples: Sequence[torch.Tensor | Mapping[str, Any]],
    identity: Mapping[str, Any],
    *,
    precision: OnnxPrecision = "fp32",
    device_type: str = "cpu",
    threads: int | None = None,
) -> OnnxTower:
    """The ONNX Runtime runner of ``head(backbone(x))``, from the cache or exported now.

    ``examples``: at least one backbone input (pixels ``(n, 3, H, W)`` float32 or a tokenizer's output); the first
    is traced, every one is used to check a fresh export against torch (give two batch sizes). The modules must be
    float32 and in eval mode. Raises :class:`ExportFailed` when the tower does not export faithfully.
    """
    if not examples:
        raise ValueError("load_tower needs at least one example input")
    signature = InputSignature.of(examples[0], "pixels" if kind == "image" else "tokens")
    module = TowerModule(backbone, head, signature).eval()
    key = cache_key(identity, kind, weights_fingerprint(module), signature, head is not None)
    fp32 = cache_dir() / f"{kind}-{key}-fp32.onnx"
    target = fp32 if precision == "fp32" else cache_dir() / f"{kind}-{key}-{precision}.onnx"
    with _export_lock:  # one export at a time in this process; other processes are kept safe by atomic writes
        fresh = False
        if not cached_ok(fp32):
            if fp32.exists():
                log.warning("the ONNX cache file %s is damaged or incomplete; exporting it again", fp32)
            _export(module, signature.tensors(examples[0]), fp32)
            _check(OnnxTower(make_session(fp32, "cpu", threads), signature, "fp32", fp32), module, examples,
                   MIN_EXPORT_COSINE)
            _record(fp32, tower=kind, identity=dict(identity), exporter=EXPORTER_VERSION, torch=torch.__version__)
            fresh = True
        if precision == "int8" and not cached_ok(target):
            _quantize(fp32, target)
            _check(OnnxTower(make_session(target, "cpu", threads), signature, "int8", target), module, examples,
                   MIN_INT8_COSINE)
            _record(target, tower=kind, source=fp32.name, quantization="dynamic MatMul/Gemm int8 per-channel")
            fresh = True
    if fresh:
        log.info("exported the %s tower to %s", kind, target)
    try:
        session = make_session(target, device_type, threads)
    except Exception as exc:
        raise ExportFailed(f"ONNX Runtime cannot load {target}: {exc}") from exc
    return OnnxTower(session, signature, precision, target)
