"""The one durable way to write a file or publish a folder: readers see the old version or the new one, never a
half-written one, and a published version survives a power cut.

Files
- :func:`atomic_path` yields a temporary path beside the target (a hidden name, ``.NAME.tmp-XXXXXXXX.SUFFIX``, so a
  glob for the target's pattern never matches it); when the block ends without error the file is fsynced, renamed
  over the target, and the folder is fsynced. On error the temporary file is removed and the target is untouched.
  :func:`atomic_write_bytes` / :func:`atomic_write_text` are the one-call forms; every writer of the project
  (index folder, shards, heads, feature cache, label cache, reports) goes through these.

Folders (publishing)
- :func:`atomic_folder` publishes a whole folder: the caller fills a hidden temporary folder, which is then fsynced
  (files and folder) and swapped in with :func:`swap_in` (an atomic ``renameat2(RENAME_EXCHANGE)`` on Linux;
  where the platform or filesystem does not support it, "rename the old aside, rename the new in", rolled back on
  error). A published folder is never written again: a change publishes a new version.
- :func:`folder_lock` serialises the writers of one folder (an ``flock`` on a hidden ``.NAME.lock`` beside it),
  so two read-modify-write updates (add, remove, sync) never lose one another's rows. :func:`atomic_folder` takes
  it; updates take it around their read as well. Under the lock, leftovers of writers killed earlier (hidden
  temporary folders, an aside copy) are cleaned up or, for a crash inside the fallback's two renames, restored.
- :func:`pinned` opens a published folder for reading by its directory handle: every file read through the path it
  yields comes from the version that was published at that instant, whatever is swapped in afterwards (Linux
  ``/proc/self/fd``; elsewhere the plain path). A reader that also opens (or memory-maps) every file it needs
  before letting go keeps its snapshot after a swap has deleted the folder's old version.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: writers of one folder are not serialised
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


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
#: errno values of ``renameat2(RENAME_EXCHANGE)`` that mean "not supported here" (kernel, libc or filesystem).
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})
_libc: Any = None
_warned_unsupported = False


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``.

    Returns False where that is not supported (another OS, a libc without ``renameat2``, a kernel or filesystem
    answering ENOSYS / EINVAL / EOPNOTSUPP), logged once. Every other failure (a missing path, permissions, I/O)
    is raised as :class:`OSError` naming both paths: the caller must not fall back to a non-atomic swap then.
    """
    global _libc, _warned_unsupported
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        if not _warned_unsupported:
            _warned_unsupported = True
            log.warning("renameat2(RENAME_EXCHANGE) is not supported for %s (%s): folders are published by two "
                        "renames instead", b, os.strerror(err))
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None, str(b))


def _aside_name(out: Path) -> Path:
    return out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"


def _siblings(out: Path, kind: str) -> list[Path]:
    """Hidden leftovers of ``out`` of one kind (``tmp``: temporary folders, ``old``: aside copies), oldest first."""
    if not out.parent.is_dir():
        return []
    found = [p for p in out.parent.glob(f".{out.name}.{kind}-*") if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


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
    old = _aside_name(out)
    os.rename(out, old)  # a crash from here to the next rename leaves no `out`: see recover_folder
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # roll back
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(out: str | Path) -> None:
    """Repair what a writer killed inside :func:`swap_in` or :func:`atomic_folder` left beside ``out``.

    Call it holding :func:`folder_lock`. If ``out`` is missing but an aside copy (``.NAME.old-*``, the fallback
    swap's first rename) exists, the newest is renamed back; then every other leftover (temporary folders, aside
    copies) is deleted. Nothing else touches those names, so a leftover is always a dead writer's.
    """
    out = Path(out)
    asides = _siblings(out, "old")
    if not out.exists() and asides:
        log.warning("restoring %s from %s (a writer was killed while swapping folders)", out, asides[-1].name)
        os.rename(asides.pop(), out)
        fsync_dir(out.parent)
    for leftover in [*asides, *_siblings(out, "tmp")]:
        shutil.rmtree(leftover, ignore_errors=True)


def published_path(out: str | Path) -> Path:
    """Where the published version of ``out`` is: ``out`` itself, or, after a writer was killed between the fallback
    swap's two renames (and before any writer repaired it), the aside copy it left. Readers call this; they never
    rename anything themselves."""
    out = Path(out)
    if out.exists():
        return out
    asides = _siblings(out, "old")
    return asides[-1] if asides else out


_held = threading.local()


@contextlib.contextmanager
def folder_lock(out: str | Path) -> Iterator[None]:
    """Hold the exclusive writer lock of the folder ``out`` (re-entrant within a thread; other threads and
    processes wait). Released by the kernel if the process dies. Leftovers of killed writers are repaired on
    entry (:func:`recover_folder`)."""
    out = Path(out).absolute()
    held: dict[Path, int] = getattr(_held, "paths", None) or {}
    _held.paths = held
    if held.get(out):
        held[out] += 1
        try:
            yield
        finally:
            held[out] -= 1
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            break
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us deletes the file as it leaves: lock the file that is there now
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        held[out] = 1
        try:
            recover_folder(out)
            yield
        finally:
            held.pop(out, None)
            with contextlib.suppress(OSError):
                lock_path.unlink()  # still holding it: nobody else can have it now
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty hidden temporary folder beside ``out``; when the block succeeds every file in it and the
    folder are fsynced and it replaces ``out`` atomically. On error it is removed and ``out`` is untouched.
    Holds :func:`folder_lock` of ``out`` throughout."""
    out = Path(out)
    with folder_lock(out):
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


class Pinned:
    """A published folder held open by its directory handle (see :func:`pinned`); a context manager that closes
    the handle at the end.

    ``path``: the path to read through (``/proc/self/fd/N`` on Linux: it resolves to this version of the folder
    for as long as the handle is open; elsewhere the folder's own path). ``real``: the folder's own path, for
    messages. :meth:`replaced` says whether another version has been published at ``real`` since.
    """

    def __init__(self, folder: str | Path):
        self.real = published_path(folder)
        self._fd = os.open(self.real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        self._ino = os.fstat(self._fd).st_ino
        proc = Path(f"/proc/self/fd/{self._fd}")
        self.path = proc if proc.is_dir() else self.real

    def replaced(self) -> bool:
        try:
            return os.stat(published_path(self.real)).st_ino != self._ino
        except OSError:
            return True

    def where(self, text: str) -> str:
        """``text`` (an error message) with the handle's path replaced by the folder's own."""
        return text.replace(str(self.path), str(self.real)) if self.path != self.real else text

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pinned(folder: str | Path) -> Pinned:
    """Open the published folder ``folder`` by its directory handle (use it as a context manager).

    Raises :class:`FileNotFoundError` / :class:`NotADirectoryError` when there is none. A version swapped out
    while pinned stays readable through ``Pinned.path`` until its files are deleted; a reader should open every
    file it needs while pinned (and retry with a fresh pin when :meth:`Pinned.replaced` says the folder changed
    underneath a failed read).
    """
    return Pinned(folder)
