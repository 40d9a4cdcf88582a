"""The crash harness: indexer commands killed (SIGKILL) or failed (ENOSPC, EFBIG) at seeded points, then rerun.

For each scenario (``build`` a fresh index, ``rebuild`` over an existing one, ``add``, ``remove``; ``sync`` once the
indexer has it) an uninterrupted run is traced first (:mod:`tests.fault_injection` lists every file-system event it
makes under its folder). Then, for seeded event numbers, the same command runs again from the same starting state
and is hit at that event:

- ``kill``: SIGKILL before the event (after it, for an fsync). Afterwards the index folder must open as exactly the
  old version or exactly the new one (never a broken one); the same command rerun must finish, and then the index
  must equal the uninterrupted run's: the same ids (no loss, no duplicate), count, vectors and skipped list, and no
  temporary folder or work folder left behind.
- ``enospc``: the operation at that event fails with ``OSError(ENOSPC)``. The command must end with a one-line
  error (exit code 2, no traceback) or, where the failure was harmless, succeed; the old index must be intact, the
  shards committed before the failure kept, and the rerun must finish as above.
- ``fsize``: the whole run under ``RLIMIT_FSIZE`` (the kernel fails writes beyond it, faiss's C++ writer too).
- ``timer`` (``make chaos``): SIGKILL after a seeded random time within the uninterrupted run's duration, which
  also lands inside writes that raise no event (faiss's).
- ``tmpfs`` (``make chaos``, root only): the run folder on a small tmpfs that fills up; then it is enlarged and the
  command rerun.
- Each ``kill`` point is also tried with the two-rename swap of filesystems without ``renameat2`` (``fallback``).

The test suite runs a small seeded sample (tests/test_crash_safety.py); ``make chaos`` runs every event of every
scenario plus timed kills and tmpfs: ``python -m tests.chaos --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.fault_injection import WRITE_EVENTS, ForkServer

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 16
INITIAL = 10  # images in the starting index of rebuild / add
REMOVED = ["img_0001.jpg", "img_0007.jpg", "img_0012.jpg"]
CORRUPT = "img_0016.jpg"  # not an image: skipped and listed by every scenario that sees it
LEFTOVER = re.compile(r"^(\.idx\..*|idx\..*partial)$")


# ----------------------------------------------------------------------------------------------------------------
# Index states
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class State:
    """What an index folder holds: ids in row order, their vectors, the skipped list."""

    ids: list[str]
    vectors: np.ndarray
    skipped: list[tuple[str, str]]

    def same_as(self, other: State, atol: float = 1e-3) -> bool:
        return not self.diff(other, atol)

    def diff(self, other: State, atol: float = 1e-3) -> str:
        """What differs from ``other`` ('' when nothing does, vectors within ``atol``)."""
        if sorted(self.ids) != sorted(other.ids):
            return (f"ids: {len(self.ids)} vs {len(other.ids)}, only here {sorted(set(self.ids) - set(other.ids))}, "
                    f"only there {sorted(set(other.ids) - set(self.ids))}")
        if sorted(self.skipped) != sorted(other.skipped):
            return f"skipped: {sorted(self.skipped)} vs {sorted(other.skipped)}"
        mine = dict(zip(self.ids, self.vectors, strict=True))
        worst = max((float(np.abs(mine[i] - v).max()) for i, v in zip(other.ids, other.vectors, strict=True)),
                    default=0.0)
        return f"vectors differ by up to {worst:.2e}" if worst > atol else ""


def observe(index: Path) -> State | None:
    """The state of the index at ``index``; None when there is none. Raises when the folder is broken (the
    harness counts that as a failure)."""
    from retrieval.errors import IndexNotFound
    from retrieval.index import IndexStore, read_vectors
    from retrieval.index.folder import read_skipped

    try:
        store = IndexStore.open(index)
    except IndexNotFound:
        if index.exists():
            raise
        return None
    if len(set(store.ids)) != len(store.ids) or store.count != len(store.ids):
        raise AssertionError(f"{index}: duplicate ids or a wrong count")
    return State(list(store.ids), read_vectors(store.path), read_skipped(store.path))


def leftovers(run: Path) -> list[str]:
    """Temporary or work folders (and lock files) a finished job should not leave."""
    return sorted(p.name for p in run.iterdir() if LEFTOVER.match(p.name))


# ----------------------------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """One command to interrupt. ``argv(run)`` is the command for a run folder; ``initial`` the folder copied in
    as ``run/idx`` first (None: no index yet)."""

    name: str
    argv: Callable[[Path], list[str]]
    initial: Path | None
    old: State | None = None
    new: State | None = None
    events: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


class Harness:
    """Source images, a tiny model, the starting indexes and the uninterrupted results of every scenario."""

    def __init__(self, work: Path, checkpoint: str, open_clip_config: tuple[str, dict[str, Any]]):
        from tests.conftest import make_images

        self.work = work
        self.src = work / "src"
        make_images(self.src, N_IMAGES)
        (self.src / CORRUPT).write_bytes(b"this is not a jpeg")
        self.encoder = f"open_clip:{open_clip_config[0]}:{checkpoint}"
        self.server = ForkServer(work, open_clip_config)
        self.runs = work / "runs"
        self.n_runs = 0
        self.scenarios: dict[str, Scenario] = {}
        self.results: Counter[str] = Counter()
        self.kill_kinds: Counter[str] = Counter()

    # -- commands ------------------------------------------------------------------------------------------------
    def _flags(self) -> list[str]:
        return ["--encoder", self.encoder, "--precision", "fp32", "--device", "cpu", "--batch-size", "4",
                "--workers", "0", "--shard-size", "3", "--no-progress"]

    def build_argv(self, out: Path, limit: int | None = None, index_key: str = "IVF2,Flat") -> list[str]:
        """``IVF2,Flat`` keeps ``vectors.npy`` in the folder: every kind of file is written."""
        return ["build", str(self.src), "--out", str(out), *self._flags(), "--index-key", index_key,
                *(["--limit", str(limit)] if limit else [])]

    def prepare(self, names: list[str]) -> None:
        """Build the starting indexes and trace every scenario uninterrupted."""
        initial_small = self.work / "initial-small" / "idx"
        initial_full = self.work / "initial-full" / "idx"
        for out, limit in ((initial_small, INITIAL), (initial_full, None)):
            ans = self.server.run(self.build_argv(out, limit), out.parent)
            assert ans.rc == 0, ans.stderr[-2000:]
        added = [str(self.src / f"img_{i:04d}.jpg") for i in range(INITIAL, N_IMAGES)] + [str(self.src / CORRUPT)]
        every = {
            "build": Scenario("build", lambda run: self.build_argv(run / "idx"), None),
            "rebuild": Scenario("rebuild", lambda run: self.build_argv(run / "idx"), initial_small),
            "add": Scenario("add", lambda run: ["add", str(run / "idx"), *added, *self._flags()], initial_small),
            "remove": Scenario("remove", lambda run: ["remove", str(run / "idx"), *REMOVED], initial_full),
        }
        for name in names:
            sc = every[name]
            run = self.fresh_run(sc, "trace")
            trace = self.work / f"trace-{name}.jsonl"
            ans = self.server.run(sc.argv(run), run, trace=str(trace))
            assert ans.rc == 0, ans.stderr[-2000:]
            sc.old = observe(sc.initial) if sc.initial else None
            sc.new = observe(run / "idx")
            assert sc.new is not None
            sc.events = [tuple(json.loads(line)) for line in trace.read_text().splitlines()]  # type: ignore[misc]
            sc.seconds = ans.seconds
            assert leftovers(run) == [], leftovers(run)
            self.scenarios[name] = sc
            shutil.rmtree(run)

    def fresh_run(self, sc: Scenario, tag: str) -> Path:
        self.n_runs += 1
        run = self.runs / f"{sc.name}-{tag}-{self.n_runs}"
        run.mkdir(parents=True)
        if sc.initial is not None:
            shutil.copytree(sc.initial, run / "idx")
        return run

    # -- one trial -----------------------------------------------------------------------------------------------
    def trial(self, name: str, mode: str, point: float | int | None = None, *, fallback: bool = False,
              run: Path | None = None) -> str:
        """Run scenario ``name`` hit by ``mode`` at ``point`` (event number, seconds or byte limit), check, rerun,
        check. Returns a one-line description; raises AssertionError on any violation."""
        sc = self.scenarios[name]
        run = run or self.fresh_run(sc, mode)
        opts: dict[str, Any] = {"no_exchange": fallback}
        where = ""
        if mode in ("kill", "enospc"):
            assert isinstance(point, int)
            opts["inject"] = {"event": point, "action": mode}
            kind, rel = sc.events[point - 1]
            where = f"{kind} {_pattern(rel)}"
            if mode == "kill":
                self.kill_kinds[f"{name}: {where}"] += 1
        elif mode == "fsize":
            opts["fsize"] = int(point or 0)
            where = f"files over {point} bytes"
        elif mode == "timer":
            opts["kill_after_s"] = float(point or 0)
            where = f"after {float(point or 0):.3f} s"
        label = f"{name} {mode}{' (fallback swap)' if fallback else ''} at {where or point}"
        argv = sc.argv(run)
        ans = self.server.run(argv, run, **opts)
        shards_before = _committed_shards(run)
        try:
            after = observe(run / "idx")
        except Exception as exc:
            raise AssertionError(f"{label}: the index folder is broken after the fault: {exc}") from exc
        if mode == "kill":
            assert ans.signal == 9, f"{label}: expected SIGKILL, got rc={ans.rc} signal={ans.signal}\n{ans.stderr}"
        elif mode == "timer":
            assert ans.signal == 9 or ans.rc == 0, f"{label}: rc={ans.rc}\n{ans.stderr[-2000:]}"
        else:  # a write error: a clear one-line error, or harmless
            assert ans.rc in (0, 2), f"{label}: exit code {ans.rc} (not a clear error)\n{ans.stderr[-3000:]}"
            assert "Traceback" not in ans.stderr, f"{label}: a traceback instead of a clear error\n{ans.stderr}"
            if ans.rc == 2:
                assert re.search(r"No space left on device|File too large", ans.stderr), f"{label}: {ans.stderr}"
        outcome = self._old_or_new(sc, after, label)
        if mode == "enospc" and outcome == "old":  # the shards committed before the failure are kept
            assert isinstance(point, int)
            committed = sum(1 for k, rel in sc.events[:point - 1] if k == "replace" and "shard-" in rel)
            assert shards_before >= committed, f"{label}: {committed} shards were committed, {shards_before} kept"
        if ans.rc == 0:
            assert outcome == "new", f"{label}: the command succeeded but the index is the {outcome} one"
        # Rerun the same command to completion.
        re_ans = self.server.run(argv, run)
        if re_ans.rc != 0:
            already = name == "remove" and outcome == "new" and "UnknownId" in re_ans.stderr
            assert already, f"{label}: the rerun failed (rc={re_ans.rc})\n{re_ans.stderr[-3000:]}"
        final = observe(run / "idx")
        assert final is not None and sc.new is not None and final.same_as(sc.new), \
            f"{label}: after the rerun the index differs from the uninterrupted run's: " \
            f"{final.diff(sc.new) if final else 'none'}\n{ans.stderr[-1500:]}\n{re_ans.stderr[-1500:]}"
        assert leftovers(run) == [], f"{label}: left behind {leftovers(run)}"
        self.results[f"{name}/{mode}{'/fallback' if fallback else ''}/{outcome}"] += 1
        shutil.rmtree(run, ignore_errors=True)
        return f"{label}: index {outcome} after the fault, {shards_before} shards kept; rerun OK"

    def _old_or_new(self, sc: Scenario, after: State | None, label: str) -> str:
        if after is None:
            assert sc.old is None, f"{label}: the index folder disappeared"
            return "old"
        assert sc.new is not None
        if after.same_as(sc.new):
            return "new"
        if sc.old is not None and after.same_as(sc.old):
            return "old"
        raise AssertionError(f"{label}: the index is neither the old nor the new one ({len(after.ids)} ids)")

    def close(self) -> None:
        self.server.close()


def _committed_shards(run: Path) -> int:
    return sum(len(list(p.glob("shard-[0-9]*.npz"))) for p in run.glob("*.partial"))


def _pattern(rel: str) -> str:
    """An event path with its random parts masked: ``.idx.tmp-*/manifest.json``."""
    return re.sub(r"(tmp|old)-[0-9a-f]{8}", r"\1-*", rel)


# ----------------------------------------------------------------------------------------------------------------
# Choosing points
# ----------------------------------------------------------------------------------------------------------------

#: Event classes every sample covers (when the scenario has them): shard writes, manifest writes, folder swaps.
CLASSES: dict[str, Callable[[str, str], bool]] = {
    "shard write": lambda k, p: "shard-" in p and k in ("open", "fsync", "replace"),
    "manifest write": lambda k, p: p.endswith("manifest.json") and k in ("open", "fsync"),
    "index file write": lambda k, p: p.endswith(("index.faiss", "vectors.npy", "meta.sqlite")) and k == "fsync",
    "folder swap": lambda k, p: k in ("exchange", "rename") and not p.endswith(".npz"),
    "old version removal": lambda k, p: k == "rmtree" and ".idx.tmp-" in p,
    "work folder removal": lambda k, p: k == "rmtree" and p.endswith(".partial"),
}


def sample_points(events: list[tuple[str, str]], n: int, rng: random.Random, writes_only: bool = False
                  ) -> list[int]:
    """``n`` event numbers (1-based): one from each class present first, then random others."""
    pool = [i + 1 for i, (k, _) in enumerate(events) if not writes_only or k in WRITE_EVENTS]
    chosen: list[int] = []
    for test in CLASSES.values():
        members = [i for i in pool if test(*events[i - 1]) and i not in chosen]
        if members and len(chosen) < n:
            chosen.append(rng.choice(members))
    rest = [i for i in pool if i not in chosen]
    chosen += rng.sample(rest, min(len(rest), n - len(chosen)))
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------------------------
# make chaos
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Callable[[int], None]]:
    """A tmpfs of ``size`` bytes mounted at ``path``; yields a function that resizes it."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield lambda s: subprocess.run(["mount", "-o", f"remount,size={s}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def tmpfs_trial(h: Harness, name: str, size: int) -> str:
    """``name`` on a tmpfs of ``size`` bytes: ENOSPC from the kernel; then enlarged and rerun."""
    sc = h.scenarios[name]
    mount = h.runs / f"tmpfs-{name}-{size}"
    with tmpfs(mount, size) as resize:
        run = mount / "run"
        run.mkdir()
        if sc.initial is not None:
            try:
                shutil.copytree(sc.initial, run / "idx")
            except OSError:
                return f"{name} tmpfs {size}: the starting index does not fit; skipped"
        argv = sc.argv(run)
        ans = h.server.run(argv, run)
        label = f"{name} on a {size}-byte tmpfs"
        assert ans.rc in (0, 2) and "Traceback" not in ans.stderr, f"{label}: rc={ans.rc}\n{ans.stderr[-3000:]}"
        if ans.rc == 2:
            assert "No space left on device" in ans.stderr, ans.stderr
        outcome = h._old_or_new(sc, observe(run / "idx"), label)
        resize(64 << 20)
        re_ans = h.server.run(argv, run)
        assert re_ans.rc == 0 or (name == "remove" and outcome == "new"), re_ans.stderr[-3000:]
        final = observe(run / "idx")
        assert final is not None and sc.new is not None and final.same_as(sc.new), f"{label}: wrong final index"
        assert leftovers(run) == [], leftovers(run)
        h.results[f"{name}/tmpfs/{outcome}"] += 1
        return f"{label}: rc {ans.rc}, index {outcome}; rerun OK"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", default="build,rebuild,add,remove")
    p.add_argument("--kills", type=int, default=0, help="kill points per scenario (0: every event)")
    p.add_argument("--errors", type=int, default=0, help="ENOSPC points per scenario (0: every write event)")
    p.add_argument("--timed", type=int, default=20, help="timed kills per scenario")
    p.add_argument("--fallback", type=int, default=10, help="kill points per scenario with the two-rename swap")
    p.add_argument("--no-tmpfs", action="store_true")
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=REPO / "bench-results" / "chaos.json")
    args = p.parse_args(argv)

    import torch

    from retrieval.encoders.open_clip_backbone import register_open_clip_config
    from tests.conftest import TINY_CLIP_CONFIG, TINY_CLIP_NAME

    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    register_open_clip_config(TINY_CLIP_NAME, TINY_CLIP_CONFIG, work)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    ckpt = work / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    h = Harness(work, str(ckpt), (TINY_CLIP_NAME, TINY_CLIP_CONFIG))
    failures: list[str] = []
    lines: list[str] = []

    def attempt(fn: Callable[[], str]) -> None:
        try:
            lines.append(fn())
        except AssertionError as exc:
            failures.append(str(exc))
            print("FAIL", str(exc).splitlines()[0], flush=True)

    try:
        names = args.scenarios.split(",")
        h.prepare(names)
        for name in names:
            sc = h.scenarios[name]
            n = len(sc.events)
            kills = range(1, n + 1) if args.kills == 0 else sample_points(sc.events, args.kills, rng)
            writes = [i for i in range(1, n + 1) if sc.events[i - 1][0] in WRITE_EVENTS]
            errors = writes if args.errors == 0 else sample_points(sc.events, args.errors, rng, writes_only=True)
            print(f"{name}: {n} events, {len(kills)} kill points, {len(errors)} write-error points, "
                  f"uninterrupted {sc.seconds:.2f} s", flush=True)
            for i in kills:
                attempt(lambda i=i, name=name: h.trial(name, "kill", i))
            for i in sample_points(sc.events, args.fallback, rng):
                attempt(lambda i=i, name=name: h.trial(name, "kill", i, fallback=True))
            for i in errors:
                attempt(lambda i=i, name=name: h.trial(name, "enospc", i))
            for limit in (256, 1024, 2048, 4096, 8192):
                attempt(lambda limit=limit, name=name: h.trial(name, "fsize", limit))
            for t in [rng.uniform(0, sc.seconds) for _ in range(args.timed)]:
                attempt(lambda t=t, name=name: h.trial(name, "timer", t))
            if not args.no_tmpfs and os.geteuid() == 0:
                for size in (12 << 10, 20 << 10, 28 << 10, 40 << 10, 64 << 10):
                    attempt(lambda size=size, name=name: tmpfs_trial(h, name, size))
    finally:
        h.close()
    total = sum(h.results.values())
    summary = {
        "seed": args.seed,
        "trials": total + len(failures),
        "failures": failures,
        "results": dict(sorted(h.results.items())),
        "kill_points_by_kind": dict(sorted(h.kill_kinds.items())),
        "events_per_scenario": {k: len(v.events) for k, v in h.scenarios.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"\n### Crash harness (seed {args.seed}): {summary['trials']} trials, {len(failures)} failures, "
          f"{summary['seconds']} s\n")
    print("| scenario / fault / index after the fault | trials |\n|---|---:|")
    for k, v in sorted(h.results.items()):
        print(f"| {k} | {v} |")
    print(f"\nresults: {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
