"""What a metadata filter asks for (torch- and numpy-free, so the HTTP layer can build one): the conditions that
:mod:`retrieval.index.metadata` turns into SQL over ``meta.sqlite``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetaFilter:
    """Which rows a search may return; every given condition must hold (None: no condition).

    ``path_prefix``: the relative path starts with it (``"2019/"`` = everything under the folder 2019).
    ``taken_after`` (inclusive) / ``taken_before`` (exclusive): normalized ISO date-times (:func:`normalize_datetime`);
    rows without ``taken_at`` fail them. ``camera``: case-insensitive substring of "make model". ``text``: every word
    appears in the captions or the path (FTS5). ``ids``: only these; ``exclude_ids``: never these.
    """

    path_prefix: str | None = None
    taken_after: str | None = None
    taken_before: str | None = None
    camera: str | None = None
    text: str | None = None
    ids: tuple[str, ...] | None = None
    exclude_ids: tuple[str, ...] | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__dataclass_fields__)

    def key(self) -> tuple[Any, ...]:
        """Hashable, for caches."""
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)
