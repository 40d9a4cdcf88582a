"""Publishing index folders: immutable versions, snapshots that keep reading their own files, one writer at a
time, errors of the atomic swap, and the leftovers of killed writers."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval import atomic as atomic_mod
from retrieval.errors import IndexCorrupt, IndexNotFound
from retrieval.index import IndexStore, add_to_index, read_vectors, remove_from_index, write_index
from retrieval.index import store as store_mod
from retrieval.index import write as write_mod
from retrieval.index.faiss_ops import read_faiss
from tests.test_index_store import IDENT, LABEL, clustered, meta, unit, write

# ---------------------------------------------------------------------------------------------------------------
# renameat2: only "not supported" falls back
# ---------------------------------------------------------------------------------------------------------------


def test_exchange_raises_on_a_real_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        atomic_mod.exchange(tmp_path / "a", tmp_path / "missing")
    assert info.value.filename == str(tmp_path / "a") and info.value.filename2 == str(tmp_path / "missing")


class _FakeLibc:
    """A libc whose renameat2 fails with ``err``."""

    def __init__(self, err: int):
        self.err = err
        self.calls = 0

    def renameat2(self, *args) -> int:
        self.calls += 1
        ctypes.set_errno(self.err)
        return -1


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP])
def test_exchange_unsupported_falls_back_to_two_renames(tmp_path, monkeypatch, err):
    write(tmp_path / "idx", unit(5, 8))
    monkeypatch.setattr(atomic_mod, "_libc", _FakeLibc(err))
    write(tmp_path / "idx", unit(7, 8), meta(7, "new"))
    assert IndexStore.open(tmp_path / "idx").ids[0] == "new0"
    assert atomic_mod._libc.calls == 1


@pytest.mark.parametrize("err", [errno.EIO, errno.EACCES, errno.EXDEV, errno.ENOSPC])
def test_swap_error_is_raised_and_the_old_folder_stays(tmp_path, monkeypatch, err):
    """Before: any renameat2 error fell back to the non-atomic two-rename swap, silently."""
    write(tmp_path / "idx", unit(5, 8))
    monkeypatch.setattr(atomic_mod, "_libc", _FakeLibc(err))
    with pytest.raises(OSError) as info:
        write(tmp_path / "idx", unit(7, 8), meta(7, "new"))
    assert info.value.errno == err
    monkeypatch.undo()
    assert IndexStore.open(tmp_path / "idx").count == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


# ---------------------------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["add", "remove", "rebuild"])
def test_a_store_keeps_reading_its_own_version_after_a_swap(tmp_path, change):
    """Before: ``vector()`` read vectors.npy by path when first asked, i.e. the new version's file with the old row
    numbers (and ``stats()`` listed the new folder)."""
    path = tmp_path / "idx"
    x = clustered(300, 16, seed=1)
    write(path, x, index_key="IVF4,PQ4x4")  # keeps vectors.npy
    old = IndexStore.open(path)
    size = old.stats()["size_bytes"]
    hits = old.search(x[:20], 5)
    if change == "add":
        add_to_index(path, clustered(50, 16, seed=2), meta(50, "new"), encoder_identity=IDENT)
    elif change == "remove":
        remove_from_index(path, [f"img{i}" for i in range(0, 299, 2)])
    else:
        write(path, clustered(300, 16, seed=3), index_key="IVF4,PQ4x4")
    new = IndexStore.open(path)
    assert new.count != old.count or not np.allclose(new.vector("img0"), x[0], atol=2e-3)
    for i in (0, 5, 299):  # the first vector() call comes after the swap
        np.testing.assert_allclose(old.vector(f"img{i}"), x[i], atol=2e-3)
    np.testing.assert_allclose(np.stack([old.vector(i) for i in old.ids]), x, atol=2e-3)
    assert old.stats()["size_bytes"] == size
    for a, b in zip(old.search(x[:20], 5), hits, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.tmp")] == []  # old version deleted


def test_open_reads_one_version_even_if_a_swap_happens_midway(tmp_path, monkeypatch):
    """A writer publishes between the reader's manifest and its index file. Before: the reader mixed the two
    versions (row counts disagree -> IndexCorrupt, or silently wrong rows when the counts matched)."""
    path = tmp_path / "idx"
    write(path, unit(10, 8, seed=1))
    real_read = store_mod.read_faiss
    done = []

    def read_then_publish_first(folder, *, mmap):
        if not done:
            done.append(1)
            write(path, unit(12, 8, seed=2), meta(12, "new"))
        return real_read(folder, mmap=mmap)

    monkeypatch.setattr(store_mod, "read_faiss", read_then_publish_first)
    s = IndexStore.open(path)  # the old version (if still there) or the new one, never a mix
    expected = {10: ("img0", unit(10, 8, seed=1)), 12: ("new0", unit(12, 8, seed=2))}
    assert s.count in expected and s.ids[0] == expected[s.count][0]
    np.testing.assert_allclose(np.stack([s.vector(i) for i in s.ids]), expected[s.count][1], atol=1e-6)


def test_open_retries_when_its_version_is_deleted_midway(tmp_path, monkeypatch):
    """The version being read is swapped out and deleted before its files are read: the open starts again on
    the new version instead of failing."""
    path = tmp_path / "idx"
    write(path, unit(10, 8, seed=1))
    real_read = store_mod.open_meta
    calls = []

    def publish_then_read(folder):
        calls.append(folder)
        if len(calls) == 1:
            write(path, unit(12, 8, seed=2), meta(12, "new"))
        return real_read(folder)

    monkeypatch.setattr(store_mod, "open_meta", publish_then_read)
    s = IndexStore.open(path)
    assert len(calls) == 2 and s.count == 12 and s.ids[0] == "new0"


def test_errors_name_the_folder_not_the_handle(tmp_path):
    write(tmp_path / "idx", unit(5, 8))
    (tmp_path / "idx" / "meta.sqlite").write_bytes(b"\xff\xfe not a database\n" * 100)
    with pytest.raises(IndexCorrupt) as info:
        IndexStore.open(tmp_path / "idx")
    assert str(tmp_path / "idx") in str(info.value) and "/proc/self/fd" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# One writer at a time
# ---------------------------------------------------------------------------------------------------------------


def test_concurrent_updates_lose_nothing(tmp_path, monkeypatch):
    """Two adds read the same version; before, the second publish dropped the first one's rows."""
    path = tmp_path / "idx"
    write(path, unit(10, 8, seed=1))
    both_read = threading.Barrier(2, timeout=5)
    real_load = write_mod._load_for_update

    def load_and_wait(p):
        out = real_load(p)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait()  # with the lock the second add only reads after the first published: this times out
        return out

    monkeypatch.setattr(write_mod, "_load_for_update", load_and_wait)
    errors: list[BaseException] = []

    def add(prefix: str, seed: int) -> None:
        try:
            add_to_index(path, unit(5, 8, seed=seed), meta(5, prefix), encoder_identity=IDENT)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(p, s)) for p, s in (("a", 2), ("b", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    s = IndexStore.open(path)
    assert s.count == 20 and len(set(s.ids)) == 20
    assert {i[0] for i in s.ids} == {"i", "a", "b"}


def test_folder_lock_is_reentrant_and_exclusive_between_threads(tmp_path):
    out = tmp_path / "x"
    order: list[str] = []

    def other() -> None:
        with atomic_mod.folder_lock(out):
            order.append("other")

    with atomic_mod.folder_lock(out), atomic_mod.folder_lock(out):
        t = threading.Thread(target=other)
        t.start()
        t.join(0.3)
        order.append("first")
    t.join(5)
    assert order == ["first", "other"]


# ---------------------------------------------------------------------------------------------------------------
# Leftovers of killed writers
# ---------------------------------------------------------------------------------------------------------------


def _kill_between_fallback_renames(tmp_path: Path) -> Path:
    """What a writer killed between the fallback swap's two renames leaves: no ``idx``, the old version aside,
    the complete new one under its temporary name."""
    path = tmp_path / "idx"
    write(path, unit(5, 8, seed=1))
    write(tmp_path / "staging" / "v", unit(7, 8, seed=2), meta(7, "new"))
    os.rename(tmp_path / "staging" / "v", tmp_path / ".idx.tmp-deadbeef")
    os.rename(path, tmp_path / ".idx.old-cafebabe")
    return path


def test_a_reader_finds_the_old_version_after_a_kill_inside_the_fallback_swap(tmp_path):
    path = _kill_between_fallback_renames(tmp_path)
    s = IndexStore.open(path)
    assert s.count == 5 and s.path.name == ".idx.old-cafebabe"
    assert read_vectors(path).shape == (5, 8)


def test_the_next_writer_restores_and_cleans_up(tmp_path):
    path = _kill_between_fallback_renames(tmp_path)
    add_to_index(path, unit(2, 8, seed=3), meta(2, "more"), encoder_identity=IDENT)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "staging") == ["idx"]
    s = IndexStore.open(path)
    assert s.count == 7 and s.ids[:5] == [f"img{i}" for i in range(5)]


def test_recover_removes_dead_temporaries_only_beside_their_own_folder(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / ".idx.tmp-0001").mkdir()
    (tmp_path / ".idx.old-0002").mkdir()
    (tmp_path / ".other.tmp-0003").mkdir()
    (tmp_path / ".idx.tmp-0004.npz").write_bytes(b"a file, not a folder")
    atomic_mod.recover_folder(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.tmp-0004.npz", ".other.tmp-0003", "idx"]


def test_atomic_folder_publishes_every_file_it_is_given(tmp_path):
    """The mechanism is generic over the files of a folder (another lane adds meta.sqlite inside it)."""
    with atomic_mod.atomic_folder(tmp_path / "f") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
        (tmp / "b.sqlite").write_bytes(b"2")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["a.bin", "b.sqlite"]
    (tmp_path / "g").mkdir()
    atomic_mod.swap_in(tmp_path / "g", tmp_path / "f")
    assert list((tmp_path / "f").iterdir()) == []


def test_missing_folder_is_index_not_found(tmp_path):
    with pytest.raises(IndexNotFound):
        IndexStore.open(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexNotFound):
        IndexStore.open(tmp_path / "file")


def test_write_index_and_read_faiss_unchanged_round_trip(tmp_path):
    x = unit(20, 8)
    write_index(tmp_path / "i", x, meta(20), encoder_identity=IDENT, encoder_label=LABEL)
    assert read_faiss(tmp_path / "i", mmap=True).ntotal == 20
    assert json.loads((tmp_path / "i" / "manifest.json").read_text())["count"] == 20


def test_nlist_of_answers_for_indexes_and_raises_for_anything_else():
    """Before: ``except Exception`` turned any error (a wrong argument, a faiss failure) into "not IVF"."""
    import faiss

    from retrieval.index.faiss_ops import nlist_of

    assert nlist_of(faiss.index_factory(8, "PCA4,IVF2,Flat")) == 2
    assert nlist_of(faiss.index_factory(8, "IVF3,PQ2x4")) == 3
    assert nlist_of(faiss.index_factory(8, "Flat")) is None
    assert nlist_of(faiss.index_factory(8, "HNSW8")) is None
    with pytest.raises(TypeError):
        nlist_of("IVF2,Flat")
