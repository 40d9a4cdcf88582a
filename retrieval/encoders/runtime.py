"""Give each tower of a built :class:`~retrieval.encoders.encoder.Encoder` its engine and precision.

:func:`setup_runtime` asks :func:`~retrieval.encoders.device.runtime_candidates` what may run each tower. One
candidate: it is used. Several (native bf16 against fp32): each is timed on this machine — the image tower on a
batch of :data:`IMAGE_BATCH` images (indexing), the text tower on one query (search) — and the faster kept; the
decision is stored in ``cache_root()/runtime-decisions.json`` keyed by the processor, the encoder, the candidates
and the library versions, so it is measured once, not at every start. The choice and its reason are logged once.

A tower whose ONNX export fails (or does not reproduce torch) falls back to torch fp32, with the reason logged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.atomic import atomic_write_text
from retrieval.encoders.cpu import CpuInfo, cpu_info
from retrieval.encoders.device import RuntimeChoice, TowerPlan, runtime_candidates
from retrieval.encoders.encoder import Encoder
from retrieval.encoders.onnx_engine import ExportFailed, OnnxTower, onnx_available
from retrieval.encoders.onnx_export import load_tower
from retrieval.paths import cache_root

log = logging.getLogger("retrieval.encoders")

#: Images per call when the image tower's candidates are timed (the indexer's CPU batch).
IMAGE_BATCH = 16
#: Captions of different lengths: the text tower's trace and export checks (two batch sizes, two lengths).
SAMPLE_CAPTIONS = ("a dog runs", "two children play in a fountain on a sunny day in the park",
                   "a man rides a bike", "a black and white dog is jumping over a red and white striped pole")
DECISIONS_FILE = "runtime-decisions.json"
DECISIONS_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Example inputs
# ----------------------------------------------------------------------------------------------------------------


def sample_pixels(encoder: Encoder, n: int, seed: int = 0) -> torch.Tensor:
    """``(n, 3, H, W)`` float32 pixels of ``n`` generated images through the encoder's own transform."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(min(n, 4)):
        base = rng.integers(0, 255, size=(1, 1, 3)).astype(np.float32)
        noise = rng.normal(0, 40, size=(96, 128, 3)).astype(np.float32)
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    pixels = torch.stack([encoder.image_transform(im) for im in images]).float()
    return pixels.repeat((n + len(images) - 1) // len(images), 1, 1, 1)[:n].contiguous()


def image_examples(encoder: Encoder) -> list[torch.Tensor]:
    """Traced batch of 2, checked again at 3 (the batch axis must stay dynamic)."""
    return [sample_pixels(encoder, 2), sample_pixels(encoder, 3, seed=1)]


def text_examples(encoder: Encoder) -> list[Any]:
    """Traced batch of 2 captions, checked again with 3 longer ones (batch and sequence axes stay dynamic)."""
    return [encoder.text_backbone.tokenize(list(SAMPLE_CAPTIONS[:2])),
            encoder.text_backbone.tokenize(list(SAMPLE_CAPTIONS[1:]))]


# ----------------------------------------------------------------------------------------------------------------
# Measuring once
# ----------------------------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], Any], min_seconds: float = 0.5, max_runs: int = 9) -> float:
    """Median seconds per call of ``fn`` after one warm-up call (at least 3 runs, until ``min_seconds``)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decision_key(cpu: CpuInfo, kind: str, identity: Mapping[str, Any], choice: RuntimeChoice,
                 threads: int | None) -> str:
    """What a measured decision depends on."""
    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    ident = {k: v for k, v in identity.items() if k != "heads_sha256"}  # heads are tiny next to the backbones
    material = {"v": DECISIONS_VERSION, "cpu": cpu.key(), "tower": kind, "encoder": ident, "threads": threads,
                "candidates": [p.label() for p in choice.candidates], "torch": torch.__version__,
                "onnxruntime": ort_version}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_decisions() -> dict[str, Any]:
    path = cache_root() / DECISIONS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def measured_choice(key: str, choice: RuntimeChoice, measure: Callable[[TowerPlan], float],
                    unit: str) -> tuple[TowerPlan, str]:
    """The fastest candidate, from the decisions file or measured now (and stored). ``measure`` returns seconds
    per call (``inf`` for a candidate that cannot run)."""
    decisions = _read_decisions()
    labels = {p.label(): p for p in choice.candidates}
    hit = decisions.get(key)
    if isinstance(hit, dict) and hit.get("plan") in labels:
        return labels[hit["plan"]], f"{choice.reason}; measured earlier on this machine: {hit.get('timings')}"
    timings = {p.label(): measure(p) for p in choice.candidates}
    best = min(choice.candidates, key=lambda p: timings[p.label()])
    shown = ", ".join(f"{label} {1000 * t:.1f} ms/{unit}" if np.isfinite(t) else f"{label} failed"
                      for label, t in timings.items())
    decisions = _read_decisions()
    decisions[key] = {"plan": best.label(), "timings": shown, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_text(cache_root() / DECISIONS_FILE, json.dumps(decisions, indent=2, sort_keys=True))
    except OSError as exc:  # a read-only cache costs a measurement next time, nothing more
        log.warning("cannot store the runtime decision: %s", exc)
    return best, f"{choice.reason}; measured now: {shown}"


# ----------------------------------------------------------------------------------------------------------------
# Setting up the towers
# ----------------------------------------------------------------------------------------------------------------


def _onnx_tower(encoder: Encoder, kind: str, precision: str) -> OnnxTower:
    if kind == "image":
        return load_tower("image", encoder.image_backbone, encoder.image_head, image_examples(encoder),
                          encoder.spec.identity(), precision=precision,  # type: ignore[arg-type]
                          device_type=encoder.device.type, threads=encoder.spec.threads)
    return load_tower("text", encoder.text_backbone, encoder.text_head, text_examples(encoder),
                      encoder.spec.identity(), precision=precision,  # type: ignore[arg-type]
                      device_type=encoder.device.type, threads=encoder.spec.threads)


def _torch_call(encoder: Encoder, kind: str, module: torch.nn.Module, dtype: torch.dtype) -> Callable[[], Any]:
    """One timed call of a torch tower in ``dtype`` (the module given, the head in float32)."""
    if kind == "image":
        inputs: Any = sample_pixels(encoder, IMAGE_BATCH).to(encoder.device, dtype)
        head = encoder.image_head
    else:
        inputs, head = encoder.text_backbone.tokenize([SAMPLE_CAPTIONS[1]]), encoder.text_head

    def run() -> Any:
        with torch.inference_mode():
            out = module(inputs).float()
            return head(out) if head is not None else out

    return run


def _plan_tower(encoder: Encoder, kind: str, choice: RuntimeChoice, cpu: CpuInfo) -> None:
    backbone = encoder.image_backbone if kind == "image" else encoder.text_backbone
    built: dict[str, Any] = {}

    def build(plan: TowerPlan) -> Any:
        if plan.label() not in built:
            if plan.engine == "onnx":
                built[plan.label()] = _onnx_tower(encoder, kind, plan.precision)
            elif plan.torch_dtype() == torch.float32:
                built[plan.label()] = backbone
            elif choice.needs_measuring:  # keep the float32 module for the other candidates
                built[plan.label()] = copy.deepcopy(backbone).to(plan.torch_dtype())
            else:
                built[plan.label()] = backbone.to(plan.torch_dtype())
        return built[plan.label()]

    def measure(plan: TowerPlan) -> float:
        try:
            runner = build(plan)
        except ExportFailed as exc:
            log.warning("%s tower: %s cannot run: %s", kind, plan.label(), exc)
            return float("inf")
        if plan.engine == "onnx":
            inputs = sample_pixels(encoder, IMAGE_BATCH) if kind == "image" else \
                encoder.text_backbone.tokenize([SAMPLE_CAPTIONS[1]])
            return time_call(lambda: runner(inputs))
        return time_call(_torch_call(encoder, kind, runner, plan.torch_dtype()))

    if choice.needs_measuring:
        key = decision_key(cpu, kind, encoder.spec.identity(), choice, encoder.spec.threads)
        plan, reason = measured_choice(key, choice, measure, "batch" if kind == "image" else "query")
    else:
        plan, reason = choice.candidates[0], choice.reason
    try:
        runner = build(plan)
    except ExportFailed as exc:
        plan, reason = TowerPlan("torch", "fp32"), f"{plan.label()} unavailable ({exc}); torch fp32"
        runner = backbone
        log.warning("%s tower falls back to torch fp32: %s", kind, exc)
    _apply(encoder, kind, plan, runner, reason)


def _apply(encoder: Encoder, kind: str, plan: TowerPlan, runner: Any, reason: str) -> None:
    onnx = runner if plan.engine == "onnx" else None
    if kind == "image":
        encoder.image_runner = onnx
        if onnx is None:
            encoder.image_backbone = runner
            encoder.image_dtype = plan.torch_dtype()
    else:
        encoder.text_runner = onnx
        if onnx is None:
            encoder.text_backbone = runner
            encoder.text_dtype = plan.torch_dtype()
    encoder.plans[kind] = plan
    encoder.reasons[kind] = reason


def setup_runtime(encoder: Encoder, cpu: CpuInfo | None = None) -> Encoder:
    """Choose and set up the engine and precision of both towers of ``encoder`` (built in float32 on its device)
    from its spec; logs the choice and the reasons once. Returns the encoder."""
    cpu = cpu or cpu_info()
    spec = encoder.spec
    onnx = onnx_available()
    for kind in ("image", "text"):
        choice = runtime_candidates(spec.precision, spec.engine, encoder.device.type, cpu, onnx)
        _plan_tower(encoder, kind, choice, cpu)
    log.info("encoder %s on %s: %s — image: %s; text: %s", spec.label(), cpu.describe(), encoder.runtime_label(),
             encoder.reasons["image"], encoder.reasons["text"])
    return encoder
