"""What the processor really does (torch-free): model name, the instruction-set flags that decide which precision is
native, and the cores this process may use.

Read from ``/proc/cpuinfo`` on Linux; elsewhere the flags are unknown (empty), so nothing is assumed native. Used by
the precision choice (:mod:`retrieval.encoders.device`) and printed in every benchmark table header.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

#: The flags that matter for inference speed, in the order they are printed.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
               "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    """``model``: the marketing name (``AMD EPYC``); ``family``/``model_number`` from cpuinfo (None elsewhere);
    ``flags``: the :data:`SPEED_FLAGS` present; ``cores``: CPUs this process may run on."""

    model: str
    family: int | None
    model_number: int | None
    flags: frozenset[str]
    cores: int

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix maths in hardware: AMX (Intel Sapphire Rapids+) or AVX512_BF16 (Cooper Lake, AMD Zen 4+)."""
        return "amx_bf16" in self.flags or "avx512_bf16" in self.flags

    @property
    def native_int8(self) -> bool:
        """int8 dot products in hardware (VNNI or AMX-INT8): where ONNX Runtime's int8 kernels pay off most."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    def isa(self) -> str:
        """Short summary for table headers: ``AVX2, AVX-512 (VNNI, BF16), no AMX``."""
        parts = ["AVX2" if "avx2" in self.flags else "no AVX2"]
        if "avx512f" in self.flags:
            sub = [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("avx512_fp16", "FP16"))
                   if flag in self.flags]
            parts.append("AVX-512" + (f" ({', '.join(sub)})" if sub else ""))
        else:
            parts.append("no AVX-512")
        parts.append("AMX (" + ", ".join(f for f in ("amx_bf16", "amx_int8") if f in self.flags) + ")"
                      if "amx_tile" in self.flags else "no AMX")
        return ", ".join(parts)

    def describe(self) -> str:
        """One line for logs and benchmark headers: model, family/model, ISA summary, cores."""
        fam = f" (family {self.family} model {self.model_number})" if self.family is not None else ""
        return f"{self.model}{fam}: {self.isa()}; {self.cores} cores"

    def key(self) -> str:
        """What a measured speed decision depends on: the processor and the cores available."""
        return f"{self.model}|{self.family}|{self.model_number}|{','.join(sorted(self.flags))}|{self.cores}"


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (the first processor block is enough)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = frozenset(fields.get("flags", "").split()) & frozenset(SPEED_FLAGS)

    def _int(key: str) -> int | None:
        value = fields.get(key, "")
        return int(value) if value.isdigit() else None

    return CpuInfo(model=fields.get("model name") or platform.processor() or platform.machine(),
                   family=_int("cpu family"), model_number=_int("model"), flags=flags, cores=cores)


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (read once per process)."""
    path = Path("/proc/cpuinfo")
    text = ""
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
    return parse_cpuinfo(text, usable_cores())
