"""Make torchvision importable beside a CPU-only torch build.

PyPI's torchvision wheels are built against CUDA torch. Beside the CPU build of the same torch release their
compiled extension does not load, so the operator schemas ``torchvision::nms`` and ``torchvision::qnms`` are never
registered and ``import torchvision`` fails in ``_meta_registrations`` ("operator torchvision::nms does not exist").
open_clip only uses torchvision's transforms, never those operators, so declaring the two schemas (without kernels)
is enough. Where the extension did load, the schemas exist and this module does nothing.
"""

from __future__ import annotations

import torch

_LIB: torch.library.Library | None = None


def _has_schema(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


def ensure_torchvision_ops() -> bool:
    """Declare the missing torchvision op schemas. Returns True when it had to (the shim is active)."""
    global _LIB
    if _LIB is not None or _has_schema("torchvision::nms"):
        return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib
    return True


ensure_torchvision_ops()
