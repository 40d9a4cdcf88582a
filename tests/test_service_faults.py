"""The service under faults: hot reloads between a good index, corrupt ones, one of another encoder and a missing
one, while a mixed load runs. No request may get a 5xx or go unanswered, and the good index keeps serving."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from service_support import jpeg_bytes, running_app

from retrieval.index import remove_from_index, write_index
from service.settings import ServiceSettings
from tests.conftest import make_images

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@asynccontextmanager
async def app_client(settings: ServiceSettings, encoder: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan; an unhandled error becomes the 500 a client would see."""
    async with running_app(settings, encoder, raise_app_exceptions=False) as (_, client):
        yield client


def _write(encoder: Any, out: Path, images: Path, identity: dict[str, Any] | None = None) -> list[str]:
    """An IVF index (so the folder holds vectors.npy too) of the images in ``images``."""
    paths = sorted(images.glob("img_*.jpg"))
    vecs = encoder.encode_images([Image.open(p).convert("RGB") for p in paths]).astype(np.float32)
    meta = [{"id": p.name, "path": p.name, "captions": [f"photo {i}"]} for i, p in enumerate(paths)]
    write_index(out, vecs, meta, encoder_identity=identity or encoder.identity(), encoder_label="tiny",
                index_key="IVF2,Flat", build={"source_root": str(images.resolve())})
    return [m["id"] for m in meta]


def _cut(name: str, keep: float) -> Callable[[Path], None]:
    def breaker(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return breaker


#: Ways an index folder can be broken on disk; each must be refused at reload (422/404), never served.
BREAKAGES: dict[str, Callable[[Path], None]] = {
    "index.faiss cut in half": _cut("index.faiss", 0.5),
    "vectors.npy cut short": _cut("vectors.npy", 0.6),
    "meta.sqlite cut short": _cut("meta.sqlite", 0.5),
    "meta.sqlite not a database": lambda f: (f / "meta.sqlite").write_bytes(b"\xff\xfe\xfa\n" * 300),
    "legacy meta.jsonl not UTF-8": lambda f: ((f / "meta.sqlite").unlink(),
                                              (f / "meta.jsonl").write_bytes(b"\xff\xfe\xfa\n" * 12)),
    "manifest.json not JSON": lambda f: (f / "manifest.json").write_text("{"),
    "manifest count wrong": lambda f: (f / "manifest.json").write_text(
        json.dumps({**json.loads((f / "manifest.json").read_text()), "count": 11})),
    "vectors.npy of complex numbers": lambda f: np.save(f / "vectors.npy", np.zeros((12, 32), np.complex64)),
    "no index.faiss": lambda f: (f / "index.faiss").unlink(),
    "empty folder": lambda f: [p.unlink() for p in f.iterdir()],
}


@pytest.fixture(scope="module")
def folders(tiny_encoder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    make_images(root / "imgs", 12)
    good = root / "good"
    _write(tiny_encoder, good, root / "imgs")
    out = {"good": good}
    for name, breaker in BREAKAGES.items():
        folder = root / name.replace(" ", "_")
        shutil.copytree(good, folder)
        breaker(folder)
        out[name] = folder
    _write(tiny_encoder, root / "other", root / "imgs", identity={**tiny_encoder.identity(), "model": "another"})
    out["another encoder"] = root / "other"
    out["missing"] = root / "missing"
    (root / "a-file").write_text("not a folder")
    out["a file"] = root / "a-file"
    return out


async def test_each_broken_folder_is_refused_and_the_good_one_keeps_serving(tiny_encoder, folders):
    """Before: a folder with a cut-short vectors.npy or complex vectors was accepted (read lazily, then a 500 on
    "similar"), and metadata that is not UTF-8 made the reload itself a 500."""
    settings = ServiceSettings(index_dir=folders["good"], warmup=False)
    async with app_client(settings, tiny_encoder) as c:
        for name, folder in folders.items():
            if name == "good":
                continue
            r = await c.post("/api/admin/reload", json={"index_dir": str(folder)})
            assert r.status_code in (404, 409, 422), (name, r.status_code, r.text)
            assert (await c.get("/api/stats")).json()["index_dir"] == str(folders["good"]), name
            r = await c.get("/api/search/similar/img_0003.jpg")
            assert r.status_code == 200 and len(r.json()["results"]) > 0, (name, r.status_code, r.text)


async def test_mixed_load_while_reloading_between_good_broken_other_and_missing(tiny_encoder, folders):
    settings = ServiceSettings(index_dir=folders["good"], warmup=False, max_wait_ms=1)
    cycle = ["good", "vectors.npy cut short", "another encoder", "missing", "meta.sqlite not a database", "good",
             "index.faiss cut in half", "a file", "manifest count wrong", "vectors.npy of complex numbers"]
    statuses: Counter[int] = Counter()
    reloads: Counter[tuple[str, int]] = Counter()
    sent = answered = 0
    stop = asyncio.Event()
    upload = jpeg_bytes((64, 48))

    async with app_client(settings, tiny_encoder) as c:

        async def user(i: int) -> None:
            nonlocal sent, answered
            n = 0
            while not stop.is_set():
                n += 1
                kind = (i + n) % 5
                sent += 1
                if kind == 0:
                    r = await c.post("/api/search", json={"query": f"photo {n % 9}", "top_k": 5})
                elif kind == 1:
                    r = await c.get(f"/api/search/similar/img_{n % 12:04d}.jpg")
                elif kind == 2:
                    r = await c.get(f"/thumbs/img_{n % 12:04d}.jpg")
                elif kind == 3:
                    r = await c.post("/api/search/image", files={"file": ("q.jpg", upload, "image/jpeg")})
                else:
                    r = await c.get("/api/search", params={"q": "photo", "top_k": 3})
                answered += 1
                statuses[r.status_code] += 1

        async def reloader() -> None:
            for round_ in range(3):
                for name in cycle:
                    r = await c.post("/api/admin/reload", json={"index_dir": str(folders[name])})
                    reloads[(name, r.status_code)] += 1
                    statuses[r.status_code] += 1
                    if r.status_code != 200:  # refused: the good index is still the one serving
                        stats = (await c.get("/api/stats")).json()
                        assert stats["index_dir"] == str(folders["good"]) and stats["count"] == 12
                    await asyncio.sleep(0.01 * (round_ + 1))
            stop.set()

        await asyncio.gather(reloader(), *(user(i) for i in range(6)))
        assert (await c.get("/readyz")).status_code == 200

    five_xx = {s: n for s, n in statuses.items() if s >= 500}
    assert not five_xx, (five_xx, reloads)
    assert sent == answered and answered > 50
    assert {s for (name, s) in reloads if name == "good"} == {200}
    assert all(s in (404, 409, 422) for (name, s) in reloads if name != "good"), reloads
    assert set(statuses) <= {200, 404, 409, 422}, statuses


async def test_requests_on_the_old_snapshot_stay_right_after_a_remove_publishes(tiny_encoder, tmp_path):
    """A remove publishes a new version in place (rows shift, the old files are deleted) while the service still
    holds the old snapshot; then it reloads the same path. Before: the first "similar" after the remove read the
    new vectors.npy with the old row numbers, i.e. another image's vector."""
    make_images(tmp_path / "imgs", 12)
    ids = _write(tiny_encoder, tmp_path / "idx", tmp_path / "imgs")
    shutil.copytree(tmp_path / "idx", tmp_path / "reference")
    settings = ServiceSettings(index_dir=tmp_path / "idx", warmup=False)
    async with app_client(settings, tiny_encoder) as c, app_client(
            settings.model_copy(update={"index_dir": tmp_path / "reference"}), tiny_encoder) as ref:
        remove_from_index(tmp_path / "idx", ids[:2])
        for i in ids[2:]:
            got, want = await c.get(f"/api/search/similar/{i}"), await ref.get(f"/api/search/similar/{i}")
            assert got.status_code == 200 and got.json()["results"] == want.json()["results"], i
        r = await c.post("/api/admin/reload")
        assert r.status_code == 200 and r.json()["count"] == 10
        after = await c.get(f"/api/search/similar/{ids[5]}", params={"top_k": 20})
        assert after.status_code == 200 and {h["id"] for h in after.json()["results"]} == set(ids[2:]) - {ids[5]}
