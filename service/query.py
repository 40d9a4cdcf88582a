"""What a search asks for, independent of HTTP and of numpy: the query-arithmetic syntax, and :class:`SearchSpec`,
the one object that travels from a route to the searcher (torch-free: the HTTP layer imports it).

Query arithmetic (rclip's syntax, in one line of text)::

    dog on a beach -people          "dog on a beach" (weight 1) minus "people" (weight -1)
    2:sunset +boat                  "sunset" (weight 2) plus "boat" (weight 1)
    red car - 0.5:"sports car"      an operator may stand alone; quotes keep words (and colons) literal

- ``+`` or ``-`` at the start of a word, or alone between words, starts a new term with that sign; a term runs until
  the next operator.
- ``N:`` (a non-negative number and a colon) at the start of a term's first word multiplies its weight.
- Words inside double quotes are taken literally (``"2:30 pm"``, ``"-rated"``).

The query vector is ``normalize(sum_i weight_i * embed(text_i) + image_weight * embed(image))``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

from retrieval.filter_spec import MetaFilter

#: Most terms one query may have (text terms from the syntax plus the ``terms`` list).
MAX_TERMS = 16
#: Largest absolute weight of a term or of the image.
MAX_WEIGHT = 10.0

Sort = Literal["score", "date_desc", "date_asc"]
Mode = Literal["vector", "hybrid"]
Compose = Literal["auto", "sum", "fusion"]

_WEIGHT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+):(.*)$", re.S)


class QuerySyntaxError(ValueError):
    """A query the arithmetic syntax cannot read (the message says why)."""


@dataclass(frozen=True)
class Term:
    """One text term and its weight (negative: search away from it)."""

    text: str
    weight: float = 1.0


def normalize_text(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped. Case is kept (not every model is uncased)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _tokens(text: str) -> list[tuple[str, str | None]]:
    """Whitespace-separated tokens as (plain head, quoted rest): ``0.5:"sports car"`` -> ``("0.5:", "sports car")``,
    ``dog`` -> ``("dog", None)``. An unclosed quote runs to the end of the text."""
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        start = i
        while i < n and not text[i].isspace() and text[i] != '"':
            i += 1
        plain = text[start:i]
        literal: str | None = None
        while i < n and text[i] == '"':  # one or more quoted parts glued to the token
            close = text.find('"', i + 1)
            close = n if close < 0 else close
            literal = (literal or "") + text[i + 1:close]
            i = close + 1
            while i < n and not text[i].isspace() and text[i] != '"':
                literal += text[i]
                i += 1
        out.append((plain, literal))
    return out


def parse_query(text: str) -> list[Term]:
    """The terms of a query written in the arithmetic syntax (module docstring). Raises :class:`QuerySyntaxError`
    for an operator or weight with no words after it, a weight out of range, or more than :data:`MAX_TERMS`."""
    terms: list[Term] = []
    words: list[str] = []
    sign = 1.0
    multiplier: float | None = None
    pending = False  # an operator or weight was read and no word yet

    def close() -> None:
        nonlocal words, sign, multiplier
        if words:
            terms.append(Term(normalize_text(" ".join(words)), sign * (1.0 if multiplier is None else multiplier)))
        elif pending:
            raise QuerySyntaxError("an operator or weight has no words after it")
        words, sign, multiplier = [], 1.0, None

    for plain, literal in _tokens(unicodedata.normalize("NFKC", text)):
        if literal is None and plain in ("+", "-"):
            close()
            sign, pending = (-1.0 if plain == "-" else 1.0), True
            continue
        if plain[:1] in ("+", "-") and (len(plain) > 1 or literal is not None):
            close()
            sign, pending = (-1.0 if plain[0] == "-" else 1.0), True
            plain = plain[1:]
        wm = _WEIGHT.match(plain)
        if wm:
            if not pending:
                close()
            multiplier, pending = float(wm.group(1)), True
            if multiplier > MAX_WEIGHT:
                raise QuerySyntaxError(f"the weight {wm.group(1)} is over the limit of {MAX_WEIGHT:g}")
            plain = wm.group(2)
        word = (plain + (literal or "")).strip()
        if word:
            words.append(word)
            pending = False
    close()
    if len(terms) > MAX_TERMS:
        raise QuerySyntaxError(f"{len(terms)} terms; the limit is {MAX_TERMS}")
    return terms


def positive_text(terms: list[Term]) -> str:
    """The words of the positive terms (what a keyword search looks for)."""
    return " ".join(t.text for t in terms if t.weight > 0)


@dataclass(frozen=True)
class SearchSpec:
    """One search: what to look for, where, and which page of the answer.

    ``terms``: weighted texts; ``image_id``: an indexed image whose vector joins the query with ``image_weight``
    (an uploaded image travels beside the spec, with the same weight); ``exclude``: ids never returned (the query
    image itself). ``k`` results from ``offset``; ``min_score`` on the cosine, ``min_relevance`` on the calibrated
    probability; ``sort``: by score, or by ``taken_at`` among the hits that pass the thresholds; ``mode``: vector
    only, or reciprocal-rank fusion of the vector ranking with BM25 over captions and path words. ``compose``: how an
    image and texts make one query: ``sum`` (weighted sum), ``fusion`` (the trained fusion head), ``auto`` (the head
    when the service has one and the query has both). ``label``: the query as the caller wrote it (echoed).
    """

    terms: tuple[Term, ...] = ()
    image_id: str | None = None
    image_weight: float = 1.0
    k: int = 10
    offset: int = 0
    min_score: float | None = None
    min_relevance: float | None = None
    filter: MetaFilter = field(default_factory=MetaFilter)
    sort: Sort = "score"
    mode: Mode = "vector"
    compose: Compose = "auto"
    exclude: tuple[str, ...] = ()
    label: str | None = None
