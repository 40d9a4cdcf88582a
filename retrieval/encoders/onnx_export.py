"""Exporting any encoder the factory builds to ONNX: each tower is exported as ``head(backbone(inputs))``
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
- ``int8``: ONNX Runtime dynamic quantisation of the fp32 graph's weight ``MatMul``/``Gemm`` nodes (per channel),
  cached beside it. Convolutions stay fp32: dynamically quantised convolutions measured slower and far less accurate on
  EfficientNet-Lite0 (cosine 0.93 to fp32).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.atomic import atomic_path, atomic_write_text
from retrieval.checksums import file_sha256
from retrieval.encoders.onnx_engine import (
    ExportFailed,
    InputSignature,
    OnnxPrecision,
    OnnxTower,
    TowerKind,
    cache_dir,
    cached_ok,
    make_session,
    session_factory,
    sidecar_path,
)

log = logging.getLogger(__name__)

#: Bump when a change here alters what an exported file holds (wrapper, opset, quantisation settings).
EXPORTER_VERSION = 2
OPSET = 17
#: A fresh export must agree with torch at least this well (cosine per row) or it is not used.
MIN_EXPORT_COSINE = 0.9999
#: int8 is checked loosely, only to catch a broken graph (its quality delta is measured by ``make bench-cpu``).
MIN_INT8_COSINE = 0.95



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
# Export and cache
# ----------------------------------------------------------------------------------------------------------------

_export_lock = threading.Lock()


def cache_key(identity: Mapping[str, Any], tower: TowerKind, fingerprint: str, signature: InputSignature,
              with_head: bool) -> str:
    """The file key: encoder identity, tower, weights, input signature, exporter and torch versions."""
    material = json.dumps({"identity": identity, "tower": tower, "weights": fingerprint, "head": with_head,
                           "inputs": [list(signature.names), signature.keyed, repr(signature.constants)],
                           "exporter": EXPORTER_VERSION, "opset": OPSET, "torch": torch.__version__},
                          sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def _record(path: Path, **meta: Any) -> None:
    atomic_write_text(sidecar_path(path), json.dumps({"sha256": file_sha256(path), **meta}, indent=2, default=str))


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


def weight_matmuls(path: Path) -> list[str]:
    """Names of the ``MatMul``/``Gemm`` nodes with a constant operand (a weight matrix). Left to itself, ONNX
    Runtime's dynamic quantiser also takes the activation x activation products of attention, and the all-MiniLM
    text tower then came out pointing elsewhere (cosine -0.08 to fp32); weights only: 0.99, 2x faster."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.name and any(i in constants for i in n.input[:2])]


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = weight_matmuls(src)
    with atomic_path(dst) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                         per_channel=True, weight_type=QuantType.QInt8)


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
    return OnnxTower(session, signature, precision, target, session_factory(target, device_type, threads))
