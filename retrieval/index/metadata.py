"""``meta.sqlite``: the metadata of an index folder in an embedded database (stdlib ``sqlite3`` with FTS5).

One row per vector, ``row`` == the FAISS id::

    items(row INTEGER PRIMARY KEY, id TEXT UNIQUE, path TEXT, folder TEXT, bytes INTEGER, width INTEGER,
          height INTEGER, mtime REAL, taken_at TEXT, taken_at_source TEXT, camera_make TEXT, camera_model TEXT,
          content_hash TEXT, camera TEXT (lower-case "make model", for the filter), captions TEXT (JSON list),
          extra TEXT (JSON object: every other field))
    items_fts   FTS5 (contentless) over the captions and the words of the path; its rowid is ``row``
    info(key, value)   schema version

``taken_at`` is a naive ISO 8601 wall-clock time ``YYYY-MM-DDTHH:MM:SS`` (see :mod:`retrieval.file_facts`), so
string order is time order. ``folder`` is the POSIX parent of ``path`` (``""`` at the top level).

The file is written once into the temporary folder of a publish (:func:`write_meta_db`) and never changed after:
:class:`MetaDB` opens it read-only and ``immutable`` (no locks, no journal), with a few connections opened up
front, so a snapshot that was swapped out keeps reading its own file until it is closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import BadInput, IndexCorrupt
from retrieval.filter_spec import MetaFilter

__all__ = ["MetaDB", "MetaFilter", "normalize_datetime", "where_clause", "write_meta_db"]

META_DB_SCHEMA = 1
#: Connections opened per database (concurrent readers; each is a file descriptor on the snapshot's file).
POOL_SIZE = 4

#: Typed columns a metadata row may carry; anything else goes to ``extra`` as JSON.
INT_COLUMNS = ("bytes", "width", "height")
FLOAT_COLUMNS = ("mtime",)
TEXT_COLUMNS = ("taken_at_source", "camera_make", "camera_model", "content_hash")
FACT_COLUMNS = (*INT_COLUMNS, *FLOAT_COLUMNS, "taken_at", *TEXT_COLUMNS)
COLUMNS = ("row", "id", "path", "folder", *FACT_COLUMNS, "camera", "captions", "extra")

SCHEMA = """
CREATE TABLE info(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items(
  row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, path TEXT NOT NULL, folder TEXT NOT NULL,
  bytes INTEGER, width INTEGER, height INTEGER, mtime REAL, taken_at TEXT, taken_at_source TEXT,
  camera_make TEXT, camera_model TEXT, content_hash TEXT, camera TEXT,
  captions TEXT NOT NULL DEFAULT '[]', extra TEXT NOT NULL DEFAULT '{}');
CREATE VIRTUAL TABLE items_fts USING fts5(captions, path, content='', tokenize='unicode61 remove_diacritics 2');
"""
#: Created after the bulk insert (faster than keeping them up to date row by row).
INDEXES = """
CREATE INDEX items_path ON items(path);
CREATE INDEX items_folder ON items(folder);
CREATE INDEX items_taken ON items(taken_at);
"""

_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_datetime(value: Any, field: str = "taken_at") -> str | None:
    """An ISO 8601 date or date-time (``str`` or :class:`datetime`) as ``YYYY-MM-DDTHH:MM:SS`` (a time-zone offset
    is dropped: the wall clock is kept); None stays None; anything else is :class:`BadInput` naming ``field``."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadInput(f"{field}: {value!r} is not an ISO 8601 date or date-time") from None
    else:
        raise BadInput(f"{field}: expected an ISO 8601 string, got {type(value).__name__}")
    return dt.replace(tzinfo=None, microsecond=0).isoformat(timespec="seconds")


def folder_of(path: str) -> str:
    """POSIX parent of a relative path; ``""`` at the top level."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else ""


#: Words too common to rank by (they match most captions, and BM25 would walk all of those rows for nothing).
STOPWORDS = frozenset({"a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "is", "it", "its", "of",
                       "on", "or", "the", "to", "with"})


def fts_terms(text: str, *, drop_stopwords: bool = False) -> list[str]:
    """The words of ``text`` as FTS5 string literals (quoted, so no word is read as an operator). With
    ``drop_stopwords``, :data:`STOPWORDS` go unless nothing else is left."""
    words = _WORD.findall(text.lower())
    if drop_stopwords:
        words = [w for w in words if w not in STOPWORDS] or words
    return ['"' + w.replace('"', '""') + '"' for w in dict.fromkeys(words)]


_ISO_SECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_SPECIAL = frozenset(("id", "path", "captions", "folder", *FACT_COLUMNS))


def _bad(i: int, col: str, what: str, v: Any) -> BadInput:
    return BadInput(f"metadata row {i}: {col} must be {what}, got {v!r}")


def _row_values(i: int, row: dict[str, Any]) -> tuple[Any, ...]:
    """One ``items`` row (in :data:`COLUMNS` order) from a metadata dict; :class:`BadInput` for wrong types."""
    rid = row["id"]
    path = row.get("path") or rid
    if not isinstance(path, str):
        raise _bad(i, "path", "a string", path)
    captions = row.get("captions") or []
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise _bad(i, "captions", "a list of strings", captions)
    facts: list[Any] = []
    for col in INT_COLUMNS:
        v = row.get(col)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise _bad(i, col, "an integer", v)
        facts.append(v)
    v = row.get("mtime")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
        raise _bad(i, "mtime", "a number", v)
    facts.append(None if v is None else float(v))
    taken = row.get("taken_at")
    if taken is not None and not (isinstance(taken, str) and _ISO_SECONDS.fullmatch(taken)):
        taken = normalize_datetime(taken, f"metadata row {i}: taken_at")
    facts.append(taken)
    for col in TEXT_COLUMNS:
        v = row.get(col)
        if v is not None and not isinstance(v, str):
            raise _bad(i, col, "a string", v)
        facts.append(v)
    extra = {k: v for k, v in row.items() if k not in _SPECIAL}
    try:
        extra_json = _json(extra) if extra else "{}"
    except (TypeError, ValueError) as exc:
        raise BadInput(f"metadata row {i}: fields must be JSON values ({exc})") from exc
    make, model = facts[-3], facts[-2]
    camera = " ".join(x for x in (make, model) if x).lower() or None
    return (i, rid, path, folder_of(path), *facts, camera, _json(captions), extra_json)


def write_meta_db(metadata: Sequence[dict[str, Any]], target: Path) -> None:
    """Write ``metadata`` (row-aligned with the index; each a dict with a unique string ``id``) as a new SQLite file
    ``target`` (which must not exist). No journal and no fsync here: the caller publishes the file atomically."""
    rows = [_row_values(i, m) for i, m in enumerate(metadata)]  # BadInput before anything is written
    con = sqlite3.connect(target)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.executescript(SCHEMA)
        con.execute("INSERT INTO info VALUES ('schema', ?)", (str(META_DB_SCHEMA),))
        con.executemany(f"INSERT INTO items({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})", rows)
        con.executemany(
            "INSERT INTO items_fts(rowid, captions, path) VALUES (?, ?, ?)",
            ((r[0], " \n".join(m.get("captions") or ()), r[2]) for r, m in zip(rows, metadata, strict=True)),
        )
        con.executescript(INDEXES)
        con.commit()
    except sqlite3.IntegrityError as exc:
        raise BadInput(f"duplicate ids in the metadata ({exc})") from exc
    finally:
        con.close()


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def where_clause(flt: MetaFilter, table: str = "items") -> tuple[str, list[Any]]:
    """SQL condition on ``table`` (the ``items`` table or its alias) and its parameters for ``flt``; ``("1", [])``
    when empty."""
    t = table
    sql: list[str] = []
    params: list[Any] = []
    if flt.path_prefix:
        sql.append(f"{t}.path >= ? AND {t}.path < ?")
        params += [flt.path_prefix, flt.path_prefix + "\U0010ffff"]
    if flt.taken_after is not None:
        sql.append(f"{t}.taken_at >= ?")
        params.append(flt.taken_after)
    if flt.taken_before is not None:
        sql.append(f"{t}.taken_at < ?")
        params.append(flt.taken_before)
    if flt.camera:
        sql.append(f"{t}.camera LIKE ? ESCAPE '\\'")
        params.append(f"%{_like_escape(flt.camera.lower())}%")
    if flt.text is not None:
        terms = fts_terms(flt.text)
        if not terms:
            raise BadInput("filter.text: no words to match")
        sql.append(f"{t}.row IN (SELECT rowid FROM items_fts WHERE items_fts MATCH ?)")
        params.append(" ".join(terms))
    if flt.ids is not None:
        sql.append(f"{t}.id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(flt.ids)))
    if flt.exclude_ids:
        sql.append(f"{t}.id NOT IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(flt.exclude_ids)))
    return (" AND ".join(sql) or "1"), params


class MetaDB:
    """A read-only, immutable ``meta.sqlite`` with a small pool of connections (thread-safe)."""

    def __init__(self, path: Path, connections: list[sqlite3.Connection], count: int):
        self.path = path
        self.count = count
        self._pool: queue.Queue[sqlite3.Connection] = queue.Queue()
        self._all = connections
        for con in connections:
            self._pool.put(con)
        self._dates: tuple[np.ndarray, np.ndarray] | None = None
        self._dates_lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, pool: int = POOL_SIZE) -> MetaDB:
        """Open ``path`` read-only (``immutable``); :class:`IndexCorrupt` when it is not such a database."""
        uri = Path(path).absolute().as_uri() + "?mode=ro&immutable=1"
        cons: list[sqlite3.Connection] = []
        try:
            for _ in range(max(1, pool)):
                cons.append(sqlite3.connect(uri, uri=True, check_same_thread=False))
            schema = cons[0].execute("SELECT value FROM info WHERE key = 'schema'").fetchone()
            if schema is None or schema[0] != str(META_DB_SCHEMA):
                raise IndexCorrupt(f"{path} has metadata schema {schema and schema[0]!r}; this code reads "
                                   f"{META_DB_SCHEMA}: rebuild the index")
            (count,) = cons[0].execute("SELECT count(*) FROM items").fetchone()
            (top,) = cons[0].execute("SELECT coalesce(max(row), -1) FROM items").fetchone()
        except sqlite3.Error as exc:
            for c in cons:
                c.close()
            raise IndexCorrupt(f"cannot read {path}: {exc}") from exc
        except IndexCorrupt:
            for c in cons:
                c.close()
            raise
        if top != count - 1:
            for c in cons:
                c.close()
            raise IndexCorrupt(f"{path}: rows are not numbered 0..{count - 1}")
        return cls(Path(path), cons, int(count))

    @classmethod
    def from_rows(cls, metadata: Sequence[dict[str, Any]]) -> MetaDB:
        """A private database built from rows (legacy ``meta.jsonl`` folders): written to a temporary file that is
        unlinked at once (the open connections keep it alive)."""
        fd, name = tempfile.mkstemp(prefix="meta-", suffix=".sqlite")
        os.close(fd)
        os.unlink(name)
        try:
            write_meta_db(metadata, Path(name))
            return cls.open(Path(name))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    def close(self) -> None:
        for con in self._all:
            con.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        con = self._pool.get()
        try:
            yield con
        finally:
            self._pool.put(con)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.connection() as con:
            try:
                return con.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise IndexCorrupt(f"{self.path}: {exc}") from exc

    # -- rows ----------------------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Every id, in row order."""
        return [r[0] for r in self._query("SELECT id FROM items ORDER BY row")]

    @staticmethod
    def _to_dict(values: tuple[Any, ...]) -> dict[str, Any]:
        rec = dict(zip(COLUMNS, values, strict=True))
        out: dict[str, Any] = {"id": rec["id"], "path": rec["path"], "captions": json.loads(rec["captions"])}
        for col in FACT_COLUMNS:
            if rec[col] is not None:
                out[col] = rec[col]
        out.update(json.loads(rec["extra"]))
        return out

    def get_many(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """Metadata dicts of ``rows`` (in that order): ``id``, ``path``, ``captions``, the facts that are set, and
        the extra fields."""
        if not len(rows):
            return []
        wanted = [int(r) for r in rows]
        found = {
            r[0]: self._to_dict(r)
            for r in self._query(f"SELECT {','.join(COLUMNS)} FROM items WHERE row IN "
                                 "(SELECT value FROM json_each(?))", (json.dumps(wanted),))
        }
        return [found[r] for r in wanted]

    def all_rows(self) -> list[dict[str, Any]]:
        """Every row's metadata dict, in row order (for writers that rebuild a folder)."""
        return [self._to_dict(r) for r in self._query(f"SELECT {','.join(COLUMNS)} FROM items ORDER BY row")]

    def column(self, name: str, rows: Sequence[int] | None = None) -> list[Any]:
        """One column (:data:`COLUMNS`) for ``rows`` (in that order; None: every row in row order)."""
        if name not in COLUMNS:
            raise BadInput(f"unknown metadata column {name!r}")
        if rows is None:
            return [r[0] for r in self._query(f"SELECT {name} FROM items ORDER BY row")]
        wanted = [int(r) for r in rows]
        found = dict(self._query(f"SELECT row, {name} FROM items WHERE row IN (SELECT value FROM json_each(?))",
                                 (json.dumps(wanted),)))
        return [found.get(r) for r in wanted]

    # -- filters -------------------------------------------------------------------------------------------------
    def _rows_of(self, sql: str, params: Sequence[Any]) -> np.ndarray:
        """The rows a ``SELECT group_concat(row) ...`` query names, int64, in its order."""
        with self.connection() as con:
            try:
                # one string from C, parsed in C: ~3x faster than iterating the cursor for large selections
                (text,) = con.execute(sql, params).fetchone()
            except sqlite3.Error as exc:
                raise IndexCorrupt(f"{self.path}: {exc}") from exc
        return np.fromstring(text, dtype=np.int64, sep=",") if text else np.zeros(0, np.int64)

    def dates(self) -> tuple[np.ndarray, np.ndarray]:
        """Every dated row's ``taken_at`` in time order (``S19`` bytes) and the rows in that order (int64): read
        once per database (the file never changes), so a date range costs two binary searches, not a SQL scan."""
        with self._dates_lock:
            if self._dates is None:
                order = "FROM items WHERE taken_at IS NOT NULL ORDER BY taken_at, row"
                rows = self._rows_of(f"SELECT group_concat(row) FROM (SELECT row {order})", ())
                with self.connection() as con:
                    (text,) = con.execute(f"SELECT group_concat(taken_at, '|') FROM (SELECT taken_at {order})"
                                          ).fetchone()
                times = np.array(text.split("|"), dtype="S19") if text else np.zeros(0, "S19")
                self._dates = (times, rows)
            return self._dates

    def _date_mask(self, after: str | None, before: str | None) -> np.ndarray:
        times, rows = self.dates()
        lo = int(np.searchsorted(times, after.encode(), "left")) if after is not None else 0
        hi = int(np.searchsorted(times, before.encode(), "left")) if before is not None else len(times)
        mask = np.zeros(self.count, dtype=bool)
        mask[rows[lo:max(lo, hi)]] = True
        return mask

    def select(self, flt: MetaFilter) -> np.ndarray | None:
        """Rows passing ``flt``, ascending int64; None when ``flt`` is empty (every row passes).

        The date range is cut from :meth:`dates` (binary search); every other condition is SQL over ``items``; the
        two are intersected as a bitmap."""
        if flt.is_empty():
            return None
        dated = flt.taken_after is not None or flt.taken_before is not None
        rest = replace(flt, taken_after=None, taken_before=None) if dated else flt
        mask = self._date_mask(flt.taken_after, flt.taken_before) if dated else None
        if rest.is_empty():
            assert mask is not None
            return np.flatnonzero(mask).astype(np.int64)
        where, params = where_clause(rest)
        rows = np.sort(self._rows_of(f"SELECT group_concat(row) FROM items WHERE {where}", params))
        return rows[mask[rows]] if mask is not None else rows

    def text_rank(self, text: str, limit: int, flt: MetaFilter | None = None) -> list[tuple[int, float]]:
        """Up to ``limit`` (row, BM25 score) pairs whose captions or path contain any word of ``text``, best first
        (FTS5 ``bm25``: lower is better), restricted to rows passing ``flt``. ``[]`` when ``text`` has no words."""
        terms = fts_terms(text, drop_stopwords=True)
        if not terms or limit < 1:
            return []
        where, params = where_clause(flt or MetaFilter())
        sql = ("SELECT items_fts.rowid, bm25(items_fts) FROM items_fts JOIN items ON items.row = items_fts.rowid "
               f"WHERE items_fts MATCH ? AND {where} ORDER BY bm25(items_fts) LIMIT ?")
        return [(int(r), float(s)) for r, s in self._query(sql, [" OR ".join(terms), *params, int(limit)])]

    def folders(self) -> list[tuple[str, int]]:
        """(folder, number of rows directly in it), by folder name."""
        rows = self._query("SELECT folder, count(*) FROM items GROUP BY folder ORDER BY folder")
        return [(f, int(n)) for f, n in rows]

    def date_range(self) -> tuple[str | None, str | None]:
        """The earliest and latest ``taken_at``."""
        lo, hi = self._query("SELECT min(taken_at), max(taken_at) FROM items")[0]
        return lo, hi
