"""Memory bounds: a real 100-megapixel JPEG and a 10,000 x 10,000 PNG bomb in the photo folder are skipped and
listed by the indexer without decoding them (peak RSS measured in a subprocess), and the service refuses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from service_support import build_test_index, running_app

from service.settings import ServiceSettings
from tests.conftest import TINY_CLIP_CONFIG, TINY_CLIP_NAME, make_images

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
#: What indexing the folder with both bombs may add to the peak RSS of indexing it without them. Decoding the
#: 100-MP JPEG alone takes 300 MiB (RGB) plus Pillow's working copy.
BOMB_RSS_ALLOWANCE = 64 * MiB

#: Runs builds in one process and prints the peak RSS (bytes, Linux VmHWM) after each. Arguments: work folder,
#: the runs (JSON list of [source folder, index folder, extra indexer flags]), model name, model config (JSON).
JOB = """
import json, sys
from pathlib import Path
work, runs, name, config = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
from retrieval.encoders.open_clip_backbone import register_open_clip_config
register_open_clip_config(name, config, work)
from indexer.cli import main
flags = ["--encoder", "open_clip:" + name, "--precision", "fp32", "--device", "cpu", "--workers", "0",
         "--no-progress"]
peaks = []
for src, out, extra in runs:
    assert main(["build", str(work / src), "--out", str(work / out), *flags, *extra]) == 0
    # VmHWM, not getrusage: ru_maxrss survives exec, so it would start at the parent's (pytest's) size
    hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")]
    peaks.append(int(hwm[0].split()[1]) * 1024)
print(json.dumps(peaks))
"""


def hundred_megapixel_jpeg(path: Path) -> Path:
    """A real 10,000 x 10,000 JPEG (a smooth gradient: about 1.2 MB on disk, 300 MB decoded)."""
    Image.linear_gradient("L").resize((10_000, 10_000)).save(path, quality=70)
    return path


def png_bomb(path: Path) -> Path:
    """A 10,000 x 10,000 PNG of about 12 KB."""
    Image.new("1", (10_000, 10_000)).save(path, optimize=True)
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("bombs")
    make_images(work / "normal", 3)
    make_images(work / "with-bombs", 3)
    hundred_megapixel_jpeg(work / "with-bombs" / "huge.jpg")
    png_bomb(work / "with-bombs" / "bomb.png")
    return work


def _skipped(index: Path) -> dict[str, str]:
    lines = (index / "skipped.jsonl").read_text().splitlines()
    return {json.loads(line)["id"]: json.loads(line)["reason"] for line in lines}


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc (Linux)")
def test_the_indexer_skips_and_lists_bombs_without_decoding_them(bombs: Path):
    """Peak RSS after indexing the normal images, then the folder with the bombs (default limit: 64 MP), then the
    same folder with the limit raised to 150 MP: the last run decodes the 100-MP JPEG, which shows the
    measurement sees a decode. (Before, a limit above Pillow's own 89-MP warning had no effect: Pillow refused.)"""
    runs = [["normal", "idx-normal", []], ["with-bombs", "idx-bombs", []],
            ["with-bombs", "idx-raised", ["--max-image-pixels", "150000000"]]]
    argv = [sys.executable, "-c", JOB, str(bombs), json.dumps(runs), TINY_CLIP_NAME, json.dumps(TINY_CLIP_CONFIG)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    normal, with_bombs, raised = json.loads(proc.stdout.strip().splitlines()[-1])
    skipped = _skipped(bombs / "idx-bombs")
    assert set(skipped) == {"huge.jpg", "bomb.png"}
    assert all("10000x10000 exceeds the limit of 64000000 pixels" in r for r in skipped.values()), skipped
    assert json.loads((bombs / "idx-bombs" / "manifest.json").read_text())["count"] == 3
    assert with_bombs - normal < BOMB_RSS_ALLOWANCE, f"peak RSS {normal / MiB:.0f} -> {with_bombs / MiB:.0f} MiB"
    # the control: decoded at 150 MP
    assert json.loads((bombs / "idx-raised" / "manifest.json").read_text())["count"] == 5
    assert raised - with_bombs > 4 * BOMB_RSS_ALLOWANCE, (with_bombs / MiB, raised / MiB)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_service_refuses_bombs_with_413_or_422(tiny_encoder, tmp_path: Path, bombs: Path):
    build_test_index(tiny_encoder, tmp_path / "idx", tmp_path / "imgs", n=3)
    settings = ServiceSettings(index_dir=tmp_path / "idx", warmup=False)
    huge = (bombs / "with-bombs" / "huge.jpg").read_bytes()
    bomb = (bombs / "with-bombs" / "bomb.png").read_bytes()
    async with running_app(settings, tiny_encoder) as (_, c):
        for name, data in (("huge.jpg", huge), ("bomb.png", bomb)):
            r = await c.post("/api/search/image", files={"file": (name, data, "image/*")})
            assert r.status_code == 422 and "exceeds the limit of 40000000 pixels" in r.json()["detail"], r.text
        small_limit = settings.model_copy(update={"max_upload_bytes": 1024 * 1024})
    async with running_app(small_limit, tiny_encoder) as (_, c):
        r = await c.post("/api/search/image", files={"file": ("huge.jpg", huge, "image/jpeg")})
        assert r.status_code == 413
