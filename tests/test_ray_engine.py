"""The Ray engine: a local Ray instance builds the same index as the single-process engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.pipeline import build_index, work_dir_for
from indexer.ray_engine import RayPlan, plan_cluster
from indexer.settings import IndexerSettings
from retrieval.encoders import EncoderSpec
from retrieval.errors import EncoderUnavailable
from retrieval.index import IndexStore, read_vectors
from retrieval.settings import EncoderSettings
from tests.conftest import TINY_CLIP_CONFIG, TINY_CLIP_NAME, make_images


class Interrupted(Exception):
    pass


@pytest.fixture
def tiny_checkpoint(tiny_encoder, tmp_path: Path) -> str:
    """The tiny model's random weights saved as an open_clip checkpoint file: every process builds the same model."""
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.image_backbone.model.state_dict(), path)
    return str(path)


def _settings(ckpt: str, **kw) -> IndexerSettings:
    enc = EncoderSettings(name=f"open_clip:{TINY_CLIP_NAME}:{ckpt}", precision="fp32", device="cpu")
    base = {"encoder": enc, "batch_size": 4, "workers": 0, "shard_size": 5, "progress": False}
    return IndexerSettings(**{**base, **kw})


def test_ray_build_equals_local_build_and_resumes(tmp_path: Path, tiny_checkpoint: str) -> None:
    from indexer.ray_engine import RayEngine

    src = tmp_path / "src"
    make_images(src, 16)
    (src / "zz_garbage.jpg").write_bytes(b"not an image")
    settings = _settings(tiny_checkpoint)

    local = build_index(src, tmp_path / "local", settings)

    # an interrupted local build leaves one committed shard; the Ray engine must resume it, not redo it
    out = tmp_path / "ray"

    def stop(n: int) -> None:
        if n == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        build_index(src, out, settings, on_shard=stop)
    assert work_dir_for(out).is_dir()

    with RayEngine(settings, num_cpus=2, open_clip_configs={TINY_CLIP_NAME: TINY_CLIP_CONFIG}) as engine:
        result = build_index(src, out, settings, engine=engine)
    assert result.resumed == 5 and result.stats.encoded == 11 and result.stats.skipped == 1
    assert [rid for rid, _ in result.skipped] == ["zz_garbage.jpg"]
    assert not work_dir_for(out).exists()

    a, b = IndexStore.open(tmp_path / "local"), IndexStore.open(out)
    assert b.ids == a.ids and len(b.ids) == 16, "same ids in the same order"
    assert b.manifest.encoder == a.manifest.encoder, "same encoder identity: the service accepts either index"
    assert b.manifest.index_key == a.manifest.index_key
    assert b.manifest.build["engine"] == "ray"
    va, vb = read_vectors(tmp_path / "local"), read_vectors(out)
    np.testing.assert_allclose(vb, va, atol=1e-5)
    assert [b.get(i) for i in range(16)] == [a.get(i) for i in range(16)], "same metadata rows"
    skipped = [json.loads(line)["id"] for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == ["zz_garbage.jpg"] == [rid for rid, _ in local.skipped]


def _spec(device: str = "auto") -> EncoderSpec:
    return EncoderSpec(backend="open_clip", model=TINY_CLIP_NAME, device=device)


@pytest.mark.parametrize(
    ("resources", "device", "expected"),
    [
        # one GPU actor per GPU, one CPU each; the other CPUs decode
        ({"CPU": 16, "GPU": 4}, "auto", RayPlan(True, 4, 1.0, 12.0)),
        ({"CPU": 8, "GPU": 1}, "cuda", RayPlan(True, 1, 1.0, 7.0)),
        # GPUs present but the spec pins the CPU: CPU actors
        ({"CPU": 16, "GPU": 2}, "cpu", RayPlan(False, 1, 8.0, 8.0)),
        # CPU only: actors of half the cluster (at most 8 CPUs), at least one CPU left to decode
        ({"CPU": 2}, "auto", RayPlan(False, 1, 1.0, 1.0)),
        ({"CPU": 64}, "auto", RayPlan(False, 7, 8.0, 8.0)),
        ({"CPU": 1}, "auto", RayPlan(False, 1, 1.0, 1.0)),
    ],
)
def test_plan_cluster(resources: dict[str, float], device: str, expected: RayPlan) -> None:
    assert plan_cluster(resources, _spec(device)) == expected


def test_plan_cluster_overrides_and_errors() -> None:
    assert plan_cluster({"CPU": 8}, _spec(), actors=3, cpus_per_actor=2) == RayPlan(False, 3, 2.0, 2.0)
    with pytest.raises(EncoderUnavailable, match="no GPU"):
        plan_cluster({"CPU": 8}, _spec("cuda"))


def test_worker_udfs_without_ray(tmp_path: Path, tiny_checkpoint: str, tiny_clip_spec) -> None:
    """decode_batch keeps bad images as error rows; EncodeActor encodes the good ones like the local encoder and
    refuses to start when its encoder differs from the driver's (another package version on a node)."""
    import ray.cloudpickle

    from indexer.pipeline import plan_records
    from indexer.ray_engine import EncodeActor, decode_batch, probe_encoder
    from retrieval.encoders import build_encoder
    from retrieval.errors import IndexEncoderMismatch
    from retrieval.images import load_image

    src = tmp_path / "src"
    paths = make_images(src, 3)
    (src / "bad.jpg").write_bytes(b"nope")
    records = plan_records(src)
    spec = _settings(tiny_checkpoint).encoder.spec()
    identity, blob = probe_encoder(spec.model_dump(), None)
    assert isinstance(ray.cloudpickle.loads(blob), type(build_encoder(spec).image_transform))

    batch = {"idx": np.arange(4), "path": np.asarray([str(r.path) for r in records], dtype=object)}
    decoded = decode_batch(batch, blob, 10_000_000)
    assert [bool(e) for e in decoded["error"]] == [True, False, False, False]  # bad.jpg sorts first
    assert decoded["pixels"].shape[0] == 4 and decoded["pixels"].dtype == np.float32

    actor = EncodeActor(spec.model_dump(), None, 1, expected_identity=identity)
    out = actor(decoded)
    local = build_encoder(spec).encode_images([load_image(p) for p in paths])
    np.testing.assert_allclose(out["vector"][1:], local, atol=1e-5)
    assert not out["vector"][0].any()

    with pytest.raises(IndexEncoderMismatch, match="same package version"):
        EncodeActor(spec.model_dump(), None, 1, expected_identity={**identity, "dim": -1})
