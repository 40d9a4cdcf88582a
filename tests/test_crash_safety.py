"""Crash safety: a job killed with SIGKILL at a chosen point resumes to the index an uninterrupted job builds.

The job runs in a subprocess (``tests/crash_job.py``) whose ``os.fsync`` is wrapped: when the file being synced
matches the kill point, the process SIGKILLs itself, so what is on disk is exactly what a crash there leaves
(a written but not yet renamed temporary file, a half-published folder...). Nothing of the job's own cleanup runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.local_engine import LocalEngine
from indexer.pipeline import build_index, work_dir_for
from indexer.settings import IndexerSettings
from retrieval.encoders import build_encoder
from retrieval.index import IndexStore, read_vectors
from retrieval.settings import EncoderSettings
from tests.conftest import TINY_CLIP_CONFIG, TINY_CLIP_NAME, make_images

ROOT = Path(__file__).resolve().parents[1]
JOB = Path(__file__).with_name("crash_job.py")


@pytest.fixture
def tiny_checkpoint(tiny_encoder, tmp_path: Path) -> str:
    """The tiny model's weights as an open_clip checkpoint: every process builds the same encoder."""
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.image_backbone.model.state_dict(), path)
    return str(path)


def _settings(ckpt: str) -> IndexerSettings:
    enc = EncoderSettings(name=f"open_clip:{TINY_CLIP_NAME}:{ckpt}", precision="fp32", device="cpu")
    return IndexerSettings(encoder=enc, batch_size=4, workers=0, shard_size=3, progress=False)


def run_job(args: dict, kill_when: dict | None) -> subprocess.CompletedProcess[str]:
    """Run ``crash_job.py`` with ``args``; ``kill_when`` = {"path_contains": [...], "nth": N}: SIGKILL at the N-th
    fsync of a file whose path contains every string."""
    spec = {"args": args, "kill_when": kill_when, "open_clip_config": [TINY_CLIP_NAME, TINY_CLIP_CONFIG]}
    return subprocess.run([sys.executable, str(JOB), json.dumps(spec)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_kill_after_a_shard_temp_file_is_written_then_resume(tmp_path: Path, tiny_checkpoint: str):
    """SIGKILL after the third shard's temporary file is written and synced, before its rename: the resume must
    neither take the temporary file for a committed shard nor lose or duplicate a vector."""
    src = tmp_path / "src"
    make_images(src, 14)
    settings = _settings(tiny_checkpoint)
    clean = tmp_path / "clean"
    encoder = build_encoder(settings.encoder.spec())
    build_index(src, clean, settings, engine=LocalEngine(encoder, settings))

    out = tmp_path / "idx"
    proc = run_job({"src": str(src), "out": str(out), "ckpt": tiny_checkpoint},
                   {"path_contains": [".partial", "shard-000002", "tmp", ".npz"], "nth": 1})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists() and work_dir_for(out).is_dir()

    result = build_index(src, out, settings, engine=LocalEngine(encoder, settings))
    assert result.resumed == 6 and result.stats.encoded == 8
    store = IndexStore.open(out)
    assert store.count == 14 and len(set(store.ids)) == 14
    ref = IndexStore.open(clean)
    np.testing.assert_allclose(read_vectors(out)[[store.row_of(i) for i in ref.ids]], read_vectors(clean), atol=1e-5)
