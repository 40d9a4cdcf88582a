"""Crash safety: indexer commands SIGKILLed or failed with ENOSPC / EFBIG at seeded points of their file-system work,
then rerun (the harness is :mod:`tests.chaos`; ``make chaos`` runs every point, timed kills and a real tmpfs).

Every trial asserts: after the fault the index folder opens as exactly the old or the new version; a write error
ends in a one-line error (exit 2) with the committed shards kept; the rerun finishes with the same ids (none lost,
none duplicated), count, vectors and skipped list as an uninterrupted run, and nothing left behind.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.chaos import CLASSES, Harness, sample_points
from tests.conftest import TINY_CLIP_CONFIG, TINY_CLIP_NAME

SEED = 12
SCENARIOS = ["build", "add", "remove"]


@pytest.fixture(scope="module")
def harness(tiny_encoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    work = tmp_path_factory.mktemp("chaos")
    ckpt = work / "tiny.pt"
    torch.save(tiny_encoder.image_backbone.model.state_dict(), ckpt)
    h = Harness(work, str(ckpt), (TINY_CLIP_NAME, TINY_CLIP_CONFIG))
    try:
        h.prepare(SCENARIOS)
        yield h
    finally:
        h.close()


def _run_all(h: Harness, trials: list[tuple]) -> None:
    failures = []
    for args, kw in trials:
        try:
            h.trial(*args, **kw)
        except AssertionError as exc:
            failures.append(str(exc)[:1500])
    assert not failures, f"{len(failures)} of {len(trials)} trials failed:\n\n" + "\n\n".join(failures)


@pytest.mark.parametrize("name", SCENARIOS)
def test_sigkill_at_every_kind_of_write_then_rerun(harness: Harness, name: str):
    """One seeded kill point inside each kind of write the command makes (shard, index file, manifest, folder
    swap, removal of the old version, removal of the work folder), plus one with the two-rename swap of
    filesystems without renameat2."""
    rng = random.Random(f"{SEED}-{name}")
    events = harness.scenarios[name].events
    points = sample_points(events, len(CLASSES), rng)
    kinds = {c for c, test in CLASSES.items() for i in points if test(*events[i - 1])}
    assert {"folder swap", "manifest write"} <= kinds, kinds
    if name != "remove":
        assert {"shard write", "work folder removal"} <= kinds, kinds
    trials: list[tuple] = [((name, "kill", i), {}) for i in points]
    trials.append(((name, "kill", rng.choice(points)), {"fallback": True}))
    _run_all(harness, trials)


@pytest.mark.parametrize("name", SCENARIOS)
def test_write_errors_are_clear_keep_the_old_index_and_resume(harness: Harness, name: str):
    """ENOSPC injected at seeded write events, and a file-size limit that the kernel enforces on every writer
    (faiss's C++ writer included: before, it left a truncated index.faiss that was then published)."""
    rng = random.Random(f"{SEED}-{name}-errors")
    points = sample_points(harness.scenarios[name].events, 2, rng, writes_only=True)
    trials: list[tuple] = [((name, "enospc", i), {}) for i in points]
    trials.append(((name, "fsize", 2048), {}))
    _run_all(harness, trials)


def test_rerun_after_a_kill_between_publishing_and_cleaning_up_an_add(harness: Harness):
    """The add published its new version and was killed before deleting its work folder. Before: the rerun
    found its own rows in the index and failed with "ids already in the index"."""
    events = harness.scenarios["add"].events
    last_removal = max(i for i, (k, p) in enumerate(events, 1) if k == "rmtree" and p.endswith(".partial"))
    _run_all(harness, [(("add", "kill", last_removal), {})])


def test_the_harness_sees_a_broken_folder(harness: Harness, tmp_path: Path):
    """The check can fail: a folder whose index file is cut short is reported, not taken for the old one."""
    sc = harness.scenarios["remove"]
    run = harness.fresh_run(sc, "broken")
    data = (run / "idx" / "index.faiss").read_bytes()
    (run / "idx" / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(AssertionError, match=r"broken|neither"):
        harness._old_or_new(sc, _observe_or_raise(run / "idx"), "broken folder")


def _observe_or_raise(index: Path):
    from tests.chaos import observe

    try:
        return observe(index)
    except Exception as exc:
        raise AssertionError(f"the index folder is broken: {exc}") from exc


def test_every_file_is_written_under_a_temporary_name(harness: Harness):
    """Every writer goes through the one atomic helper: each file the commands open for writing is a hidden
    temporary (``.NAME.tmp-XXXXXXXX.EXT``) or lies in a hidden temporary folder that is swapped in whole; the lock
    file is the one exception (it holds no data)."""
    temp = re.compile(r"(^|/)\.[^/]+\.tmp-[0-9a-f]{8}(\.[a-z]+)?(/|$)")
    for name, sc in harness.scenarios.items():
        writes = [rel for kind, rel in sc.events if kind == "open" and not rel.endswith(".lock")]
        assert writes, name
        in_place = [rel for rel in writes if not temp.search(rel)]
        assert not in_place, (name, in_place)
