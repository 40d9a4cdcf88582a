"""Where an encoder runs, and how each tower runs there: engine (torch / ONNX Runtime) and precision.

The rule (:func:`runtime_candidates`), never an emulated type by default:

- CUDA: torch fp16 (``engine=onnx``: ONNX Runtime's CUDA provider where installed, else its CPU provider).
- CPU, ``precision=auto``: fp32 through ONNX Runtime where it is installed (torch otherwise); bf16 is a candidate
  only where the processor does it natively (AMX or AVX512_BF16), and then it is *measured* against the fp32
  candidate once per processor, encoder and library versions (:mod:`retrieval.encoders.autotune`) and kept only
  where it is faster.
- ``int8`` (opt-in) is ONNX Runtime dynamic quantisation; ``bf16``/``fp16`` given explicitly run in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from retrieval.encoders.cpu import CpuInfo
from retrieval.encoders.spec import Engine, Precision
from retrieval.errors import BadInput, EncoderUnavailable

EngineName = Literal["torch", "onnx"]
ConcretePrecision = Literal["fp32", "bf16", "fp16", "int8"]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderUnavailable("device 'cuda' was asked for but no GPU is visible; use --device cpu or auto")
    return dev


@dataclass(frozen=True)
class TowerPlan:
    """How one tower runs."""

    engine: EngineName
    precision: ConcretePrecision

    def label(self) -> str:
        return f"{self.engine} {self.precision}"

    def torch_dtype(self) -> torch.dtype:
        """The dtype of the torch modules of this tower (ONNX graphs are exported from float32 modules)."""
        if self.engine == "onnx":
            return torch.float32
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


@dataclass(frozen=True)
class RuntimeChoice:
    """The plans to choose between (one: decided by capability alone; several: measure) and why."""

    candidates: tuple[TowerPlan, ...]
    reason: str

    @property
    def needs_measuring(self) -> bool:
        return len(self.candidates) > 1


def runtime_candidates(precision: Precision, engine: Engine, device_type: str, cpu: CpuInfo,
                       onnx: bool) -> RuntimeChoice:
    """What may run a tower, from what was asked, the device, the processor's native types and whether ONNX
    Runtime is installed. Raises :class:`BadInput` for combinations that do not exist (``torch`` + ``int8``,
    ``onnx`` + ``bf16``/``fp16``) and :class:`EncoderUnavailable` when ``onnx``/``int8`` is asked without ONNX
    Runtime."""
    if engine == "torch" and precision == "int8":
        raise BadInput("int8 runs through ONNX Runtime: use engine onnx or auto with precision int8")
    if engine == "onnx" and precision in ("bf16", "fp16"):
        raise BadInput(f"{precision} runs in torch: use engine torch or auto with precision {precision} "
                       "(ONNX Runtime runs fp32 or int8 here)")
    if (engine == "onnx" or precision == "int8") and not onnx:
        raise EncoderUnavailable("ONNX Runtime is not installed: `pip install onnxruntime onnx`, or use --engine torch")

    def one(eng: EngineName, prec: ConcretePrecision, reason: str) -> RuntimeChoice:
        return RuntimeChoice((TowerPlan(eng, prec),), reason)

    if precision == "int8":
        return one("onnx", "int8", "int8 asked for (ONNX Runtime dynamic quantisation)")
    if device_type == "cuda":
        if engine == "onnx":
            return one("onnx", "fp32", "onnx asked for on CUDA")
        prec: ConcretePrecision = "fp16" if precision == "auto" else precision
        return one("torch", prec, "CUDA: torch " + ("fp16 (auto)" if precision == "auto" else f"{prec} asked for"))
    if precision in ("bf16", "fp16"):
        note = "" if precision != "bf16" or cpu.native_bf16 else " (not native on this CPU: emulated, slow)"
        return one("torch", precision, f"{precision} asked for{note}")
    fp32_engine: EngineName = "onnx" if engine == "onnx" or (engine == "auto" and onnx) else "torch"
    why_engine = {"onnx": "ONNX Runtime" + (" asked for" if engine == "onnx" else " installed"),
                  "torch": "torch asked for" if engine == "torch" else "ONNX Runtime not installed"}[fp32_engine]
    fp32 = TowerPlan(fp32_engine, "fp32")
    if precision == "fp32" or engine == "onnx":
        return RuntimeChoice((fp32,), f"fp32 ({'asked for' if precision == 'fp32' else 'onnx runs fp32'}); "
                                      f"{why_engine}")
    if not cpu.native_bf16:
        return RuntimeChoice((fp32,), f"no native bf16 on this CPU ({cpu.isa()}): bf16 would be emulated, so fp32; "
                                      f"{why_engine}")
    native = "AMX" if "amx_bf16" in cpu.flags else "AVX512_BF16"
    return RuntimeChoice((TowerPlan("torch", "bf16"), fp32),
                         f"native bf16 ({native}): torch bf16 measured against {fp32.label()}")
