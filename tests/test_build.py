"""The indexing job: end to end, corrupt images, interruption and resume, encoder mismatch, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.cli import main as cli_main
from indexer.local_engine import LocalEngine
from indexer.pipeline import build_index, work_dir_for
from indexer.settings import IndexerSettings
from indexer.shards import ShardStore
from retrieval.errors import IndexEncoderMismatch
from retrieval.index import IndexStore, read_vectors
from tests.conftest import TINY_CLIP_NAME, make_images


class Interrupted(Exception):
    pass


def _settings(**kw) -> IndexerSettings:
    base = {"batch_size": 4, "workers": 0, "shard_size": 3, "progress": False}
    return IndexerSettings(**{**base, **kw})


def _build(src, out, settings: IndexerSettings, encoder, **kw):
    """``build_index`` with the local engine around an already built encoder."""
    return build_index(src, out, settings, engine=LocalEngine(encoder, settings), **kw)


def test_build_indexes_every_image_with_captions(image_folder, tiny_encoder, tmp_path):
    out = tmp_path / "idx"
    result = _build(image_folder, out, _settings(), tiny_encoder)
    store = IndexStore.open(out, expected_encoder=tiny_encoder.identity())
    assert store.count == 12 == result.manifest.count == result.stats.encoded
    assert store.ids == sorted(store.ids) and store.ids[0] == "img_0000.jpg"
    assert store.get(store.row_of("img_0003.jpg"))["captions"] == ["picture number 3", "image 3"]
    assert result.manifest.build["source_root"] == str(image_folder.absolute())
    assert result.manifest.build["encoder_spec"]["model"] == TINY_CLIP_NAME
    assert not work_dir_for(out).exists()  # the work folder is removed once the index is written
    # every stored vector is the encoder's embedding of that image
    from retrieval.images import load_image

    expected = tiny_encoder.encode_images([load_image(image_folder / "img_0005.jpg")])[0]
    np.testing.assert_allclose(store.vector("img_0005.jpg"), expected, atol=1e-5)
    scores, rows = store.search(expected[None, :], 1)
    assert store.ids[rows[0, 0]] == "img_0005.jpg" and scores[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_corrupt_and_truncated_images_are_skipped_and_listed(tmp_path, tiny_encoder):
    src = tmp_path / "src"
    good = make_images(src, 5)
    (src / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    data = good[0].read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "idx"
    for workers in (0, 2):
        result = _build(src, out, _settings(workers=workers), tiny_encoder)
        assert result.manifest.count == 5
        assert sorted(rid for rid, _ in result.skipped) == ["garbage.jpg", "truncated.jpg"]
        assert result.manifest.build["skipped"] == 2
        listed = [json.loads(line)["id"] for line in (out / "skipped.jsonl").read_text().splitlines()]
        assert sorted(listed) == ["garbage.jpg", "truncated.jpg"]


def test_interrupted_build_resumes_with_exact_count(tmp_path, tiny_encoder):
    src = tmp_path / "src"
    make_images(src, 14)
    clean = tmp_path / "clean"
    _build(src, clean, _settings(), tiny_encoder)

    out = tmp_path / "idx"

    def stop_after_two(n: int) -> None:
        if n == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        _build(src, out, _settings(), tiny_encoder, on_shard=stop_after_two)
    assert not out.exists()
    partial = ShardStore(work_dir_for(out), tiny_encoder.identity(), src.absolute())
    assert len(partial.done_ids()) == 6  # two shards of three committed

    encoded_later: list[int] = []
    result = _build(src, out, _settings(), tiny_encoder, on_shard=encoded_later.append)
    assert result.resumed == 6 and result.stats.encoded == 8
    store = IndexStore.open(out)
    assert store.count == 14 and len(set(store.ids)) == 14
    # same vectors as an uninterrupted build, row for row by id
    ref = IndexStore.open(clean)
    got = read_vectors(out)[[store.row_of(i) for i in ref.ids]]
    np.testing.assert_allclose(got, read_vectors(clean), atol=1e-5)


def test_resume_with_another_encoder_is_refused(tmp_path, tiny_encoder, tiny_clip_spec):
    src = tmp_path / "src"
    make_images(src, 8)
    out = tmp_path / "idx"

    def stop(n: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        _build(src, out, _settings(), tiny_encoder, on_shard=stop)

    from retrieval.encoders import build_encoder
    from retrieval.heads import HeadConfig, HeadPair, save_heads

    ckpt = tmp_path / "h.pt"
    save_heads(HeadPair(HeadConfig(kind="residual", image_in=32, text_in=32, out_dim=32)), ckpt)
    other = build_encoder(tiny_clip_spec.model_copy(update={"heads": str(ckpt)}))
    with pytest.raises(IndexEncoderMismatch, match="another encoder"):
        _build(src, out, _settings(), other)


def test_cli_build_search_add_remove(tmp_path, tiny_clip_spec, capsys):
    src = tmp_path / "src"
    make_images(src / "a", 6)
    out = tmp_path / "idx"
    enc = f"open_clip:{TINY_CLIP_NAME}"
    torch.manual_seed(0)  # the tiny model has random weights: the same seed gives the same model in each command
    assert cli_main(["build", str(src), "--out", str(out), "--encoder", enc, "--precision", "fp32",
                     "--workers", "0", "--no-progress"]) == 0
    assert "indexed 6 images" in capsys.readouterr().out

    torch.manual_seed(0)
    assert cli_main(["search", str(out), "a photo", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["id"].startswith("a/") for h in hits)

    make_images(src / "b", 2, seed=7)
    torch.manual_seed(0)
    assert cli_main(["add", str(out), str(src / "b"), "--workers", "0", "--no-progress"]) == 0
    assert IndexStore.open(out).count == 8
    assert cli_main(["remove", str(out), "a/img_0000.jpg", "b/img_0001.jpg"]) == 0
    store = IndexStore.open(out)
    assert store.count == 6 and "a/img_0000.jpg" not in store.ids and "b/img_0000.jpg" in store.ids

    # errors are reported cleanly, with a non-zero exit code and nothing changed
    assert cli_main(["remove", str(out), "no/such.jpg"]) == 2
    assert "UnknownId" in capsys.readouterr().err
    assert IndexStore.open(out).count == 6
    assert cli_main(["info", str(tmp_path / "missing")]) == 2


def test_cli_search_refuses_an_index_of_another_encoder(tmp_path, tiny_encoder, capsys):
    src = tmp_path / "src"
    make_images(src, 4)
    out = tmp_path / "idx"
    _build(src, out, _settings(), tiny_encoder)
    # the index was built with the tiny model; searching it with the default encoder must fail loudly
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["model"] == TINY_CLIP_NAME
    rc = cli_main(["search", str(out), "a dog", "--encoder", "dual:efficientnet-lite0", "--precision", "bf16"])
    assert rc == 2
    assert "IndexEncoderMismatch" in capsys.readouterr().err


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("INDEXER_BATCH_SIZE", "7")
    monkeypatch.setenv("INDEXER_ENCODER__NAME", "clip-vit-b-32")
    s = IndexerSettings()
    assert s.batch_size == 7 and s.encoder.spec().model == "ViT-B-32"


def test_flickr8k_dataset_plan(flickr8k):
    from indexer.pipeline import plan_records, source_root

    records = plan_records(flickr8k, split="test")
    assert len(records) == 1000 and all(len(r.captions) == 5 for r in records)
    assert source_root(records) == (flickr8k / "images").absolute()
    assert Path(records[0].path).is_file()


def test_skipped_list_is_part_of_the_published_folder_and_survives_add_and_remove(tmp_path, tiny_encoder):
    """skipped.jsonl is written inside the folder before it is swapped in, and add/remove carry it over (they used to
    publish a folder without it)."""
    from indexer.pipeline import add_images
    from retrieval.index import remove_from_index

    src = tmp_path / "src"
    make_images(src / "a", 4)
    (src / "a" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "idx"
    settings = _settings()
    _build(src, out, settings, tiny_encoder)

    def listed() -> list[str]:
        return [json.loads(line)["id"] for line in (out / "skipped.jsonl").read_text().splitlines()]

    assert listed() == ["a/broken.jpg"]
    remove_from_index(out, ["a/img_0000.jpg"])
    assert listed() == ["a/broken.jpg"]
    make_images(src / "b", 2, seed=3)
    (src / "b" / "also-broken.png").write_bytes(b"\x89PNG nope")
    manifest, skipped = add_images(out, [src / "b"], settings, root=src, engine=LocalEngine(tiny_encoder, settings))
    assert manifest.count == 5 and [i for i, _ in skipped] == ["b/also-broken.png"]
    assert sorted(listed()) == ["a/broken.jpg", "b/also-broken.png"]


def test_a_partly_deleted_work_folder_never_has_a_shard_overwritten(tmp_path, tiny_encoder):
    """A kill while the finished job deleted its work folder leaves shards 2..4 of 0..4. Before: the next shard was
    numbered by count (3) and overwrote a committed one, losing its vectors."""
    src = tmp_path / "src"
    make_images(src, 14)
    out = tmp_path / "idx"

    def stop(n: int) -> None:
        if n == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        _build(src, out, _settings(), tiny_encoder, on_shard=stop)
    work = work_dir_for(out)
    for name in ("shard-000000.npz", "shard-000001.npz"):
        (work / name).unlink()
    result = _build(src, out, _settings(), tiny_encoder)
    assert result.resumed == 8 and result.stats.encoded == 6
    store = IndexStore.open(out)
    assert store.count == 14 and sorted(store.ids) == sorted(p.name for p in src.glob("*.jpg"))


def test_add_again_changes_nothing_and_succeeds(tmp_path, tiny_encoder):
    """Running the same add twice (a user's rerun, or a rerun after a kill once it had published). Before: the
    second run failed with "ids already in the index"."""
    from indexer.pipeline import add_images

    src = tmp_path / "src"
    make_images(src / "a", 3)
    out = tmp_path / "idx"
    settings = _settings()
    _build(src, out, settings, tiny_encoder)
    make_images(src / "b", 2, seed=5)
    (src / "b" / "broken.jpg").write_bytes(b"nope")
    engine = LocalEngine(tiny_encoder, settings)
    first, skipped = add_images(out, [src / "b"], settings, root=src, engine=engine)
    vectors = read_vectors(out)
    again, skipped_again = add_images(out, [src / "b", src / "a"], settings, root=src, engine=engine)
    assert first.count == again.count == 5 and [i for i, _ in skipped] == [i for i, _ in skipped_again]
    np.testing.assert_array_equal(read_vectors(out), vectors)
    assert not work_dir_for(out.with_name("idx.add")).exists()
