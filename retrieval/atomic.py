"""The one durable way to write a file or publish a folder: readers see the old version or the new one, never a
half-written one, and a published version survives a power cut.

- :func:`atomic_path` yields a temporary path beside the target (a hidden name, ``.NAME.tmp-XXXXXXXX.SUFFIX``, so a
  glob for the target's pattern never matches it); when the block ends without error the file is fsynced, renamed
  over the target, and the folder is fsynced. On error the temporary file is removed and the target is untouched.
  :func:`atomic_write_bytes` / :func:`atomic_write_text` are the one-call forms; every writer of the project
  (index folder, shards, heads, feature cache, label cache) goes through these.
- :func:`atomic_folder` does the same for a whole folder: the caller fills a hidden temporary folder, which is then
  fsynced (files and folder) and swapped in with :func:`swap_in` (an atomic ``renameat2(RENAME_EXCHANGE)`` on
  Linux; elsewhere "rename the old aside, rename the new in", rolled back on error).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames, creations) to disk; a no-op where the filesystem refuses."""
    with contextlib.suppress(OSError):
        fsync_file(path)


def temp_name(target: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``target`` that keeps its suffix: ``dir/.NAME.tmp-1a2b3c4d.npz`` for ``dir/NAME.npz``."""
    return target.with_name(f".{target.stem}.{kind}-{uuid.uuid4().hex[:8]}{target.suffix}")


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it atomically replaces ``target`` (durably)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically and durably."""
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically and durably."""
    atomic_write_bytes(target, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc: Any = None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


def swap_in(tmp: Path, out: Path) -> None:
    """Make ``tmp`` (a complete folder) become ``out``; the previous ``out``, if any, is deleted afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        fsync_dir(out.parent)
        return
    if exchange(tmp, out):  # tmp now holds the old folder
        fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # roll back
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty hidden temporary folder beside ``out``; when the block succeeds every file in it and the
    folder are fsynced and it replaces ``out`` atomically. On error it is removed and ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
