"""The index folder: choosing the FAISS index type, the manifest, FAISS plumbing, the rows, reading and writing.

Folder layout (``SCHEMA_VERSION`` 1)::

    index.faiss     the FAISS index; row ``i`` of the index has FAISS id ``i`` (no IDMap)
    meta.sqlite     the rows' metadata (:mod:`retrieval.index.metadata`): id, path, folder, size, pixel size, mtime,
                    taken_at, camera, content hash, captions, extra fields; FTS5 over captions and path words.
                    Folders from before it hold ``meta.jsonl`` (one JSON object per row): read into a private
                    database on open, with a hint to run ``python -m indexer migrate``.
    manifest.json   :class:`Manifest`: schema version, encoder identity + label, dim, metric "ip", index key,
                    count, build parameters, created_at (ISO 8601 UTC)
    vectors.npy     only for indexes that cannot give their vectors back (IVF-PQ): the original vectors as
                    float16, ``(count, dim)``. Costs ``2 * dim`` bytes per vector (1 KiB at d=512, i.e. ~10x the
                    PQ codes); it is what lets :func:`add_to_index` / :func:`remove_from_index` / ``vector(id)`` /
                    :func:`read_vectors` work for every index type. Flat and HNSW indexes keep the exact float32
                    vectors themselves, so they have no ``vectors.npy``.
    skipped.jsonl   images the job could not encode: {"id", "reason"} per line (absent when none)

A published folder is immutable. Every write builds the complete new version in a hidden temp folder and swaps it
in atomically (:func:`retrieval.atomic.atomic_folder`); readers therefore see the old version or the new one,
never a mix, and an :class:`IndexStore` opened before the swap keeps reading its own version's files (it pins the
folder and maps every file at open). Writers of one folder take turns (:func:`retrieval.atomic.folder_lock` around
each read-modify-publish), so concurrent add/remove/sync lose nothing.

Row ``i`` == FAISS id ``i`` keeps search results trivially mapped to ``ids[i]`` / ``metadata[i]``, and lets a
metadata filter (SQL over ``meta.sqlite``) reach FAISS as an id selector (:mod:`retrieval.index.filters`). Removal keeps
the relative order of the remaining rows and rebuilds the index from the kept vectors (trained IVF/PQ indexes
are reused, not retrained); additions are appended with ``index.add``.

Vectors are inner-product (``metric "ip"``) over L2-normalised float32 embeddings, so scores are cosines.
"""

from retrieval.index.choose import choose_index_key, default_memory_budget, machine_memory_bytes
from retrieval.index.faiss_ops import configure_faiss, faiss_gpu_count, set_thread_omp_threads
from retrieval.index.filters import filtered_search, score_rows
from retrieval.index.manifest import Manifest, check_encoder, read_manifest
from retrieval.index.metadata import MetaDB, MetaFilter
from retrieval.index.store import IndexStore
from retrieval.index.write import add_to_index, read_vectors, remove_from_index, write_index

__all__ = [
    "IndexStore",
    "Manifest",
    "MetaDB",
    "MetaFilter",
    "add_to_index",
    "check_encoder",
    "choose_index_key",
    "configure_faiss",
    "default_memory_budget",
    "faiss_gpu_count",
    "filtered_search",
    "machine_memory_bytes",
    "read_manifest",
    "read_vectors",
    "remove_from_index",
    "score_rows",
    "set_thread_omp_threads",
    "write_index",
]
