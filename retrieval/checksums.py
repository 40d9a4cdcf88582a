"""File checksums (torch-free): SHA-256 of weight and head files, with a small bounded cache keyed by
(resolved path, mtime, size) so a file that changes is hashed again."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

from retrieval.errors import EncoderUnavailable

#: Checksums kept in memory (weights files are hashed once per process, not once per identity() call).
SHA_CACHE_SIZE = 256

_cache: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_lock = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_file_sha256(path: str | Path) -> str:
    """:func:`file_sha256` through a bounded LRU cache; :class:`EncoderUnavailable` when the file is missing."""
    p = Path(path)
    if not p.is_file():
        raise EncoderUnavailable(f"file not found: {path}")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    digest = file_sha256(p)
    with _lock:
        _cache[key] = digest
        while len(_cache) > SHA_CACHE_SIZE:
            _cache.popitem(last=False)
    return digest
