"""Fault injection for the crash harness (:mod:`tests.chaos`): run an indexer command in a forked child and, at a
chosen file-system event, SIGKILL it or make the operation fail with an OSError.

Events are what the job does to files under a root folder, seen *before* they happen:

- Python's audit hooks: ``open`` for writing, ``os.mkdir``, ``os.rename``, ``os.replace``, ``os.remove``,
  ``os.rmdir``, ``shutil.rmtree``, ``sqlite3.connect``;
- two wrapped calls: ``os.fsync`` (seen after the sync, with the file's path from ``/proc/self/fd``) and
  :func:`retrieval.atomic.exchange` (the folder swap).

Writes done in C (faiss's ``write_index``) raise no audit event; the events around them (the ``fsync`` of each file
of a folder being published) and the timed kills of ``make chaos`` cover those moments, and ``RLIMIT_FSIZE`` makes
the kernel fail them.

The fork server (``python tests/fault_injection.py``) imports torch, open_clip and the indexer once, runs no
computation itself (so forking is safe), then serves one JSON request per stdin line, answering one JSON line:

    request  {"argv": [...], "root": DIR, "stderr": FILE, "inject": {"event": N, "action": "kill" | "enospc"}
              | null, "trace": FILE | null, "fsize": BYTES | null, "kill_after_s": SECONDS | null,
              "no_exchange": bool}
    answer   {"rc": exit code or null, "signal": signal number or null, "seconds": wall time}

``trace``: the child writes every event it saw (one JSON list ``[kind, path]`` per line) to that file at exit.
``fsize``: ``RLIMIT_FSIZE`` for the child (writes beyond it fail with EFBIG, as on a full disk).
``no_exchange``: behave as on a filesystem without ``renameat2(RENAME_EXCHANGE)`` (the two-rename fallback).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
#: Events at which an injected write error makes sense (removals failing are ignored by design: leftovers).
WRITE_EVENTS = frozenset({"open", "mkdir", "rename", "replace", "fsync", "exchange", "sqlite3.connect"})


class Injector:
    """Counts the file-system events under ``root``; at event ``at`` it kills the process or raises."""

    def __init__(self, root: str, at: int | None, action: str, record: bool):
        self.root = os.path.realpath(root)
        self.at = at
        self.action = action
        self.record = record
        self.events: list[tuple[str, str]] = []
        self.n = 0
        self.off = False

    def _rel(self, path: Any, dir_fd: int | None = None) -> str | None:
        if isinstance(path, int):
            return None
        path = os.fsdecode(path)
        if not os.path.isabs(path):
            if dir_fd is None or dir_fd < 0:
                path = os.path.join(os.getcwd(), path)
            else:
                try:
                    path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
                except OSError:
                    return None
        path = os.path.normpath(path)
        if path != self.root and not path.startswith(self.root + os.sep):
            return None
        return os.path.relpath(path, self.root)

    def event(self, kind: str, rel: str | None) -> None:
        if rel is None or self.off:
            return
        self.n += 1
        if self.record:
            self.events.append((kind, rel))
        if self.at is not None and self.n == self.at:
            if self.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind in WRITE_EVENTS:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)", rel)

    def audit(self, ev: str, args: tuple[Any, ...]) -> None:
        if self.off:
            return
        if ev == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing:
                self.event("open", self._rel(path))
        elif ev in ("os.rename", "os.replace"):
            self.event(ev[3:], self._rel(args[0], args[2]))
        elif ev in ("os.remove", "os.rmdir"):
            self.event(ev[3:], self._rel(args[0], args[1]))
        elif ev == "os.mkdir":
            self.event("mkdir", self._rel(args[0], args[2]))
        elif ev == "shutil.rmtree":
            self.event("rmtree", self._rel(args[0]))
        elif ev == "sqlite3.connect":
            self.event("sqlite3.connect", self._rel(args[0]) if isinstance(args[0], str | bytes) else None)

    def install(self, no_exchange: bool) -> None:
        from retrieval import atomic

        real_fsync = os.fsync
        real_exchange = atomic.exchange

        def fsync(fd: Any) -> None:
            real_fsync(fd)
            try:
                path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            except OSError:
                return
            self.event("fsync", self._rel(path))

        def exchange(a: Path, b: Path) -> bool:
            if no_exchange:
                return False
            self.event("exchange", self._rel(str(b)))
            return real_exchange(a, b)

        os.fsync = fsync
        atomic.exchange = exchange  # type: ignore[assignment]
        sys.addaudithook(self.audit)


# ----------------------------------------------------------------------------------------------------------------
# The client side (the harness's end of the pipe)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    rc: int | None
    signal: int | None
    seconds: float
    stderr: str


class ForkServer:
    """``tests/fault_injection.py`` as a long-lived subprocess: one forked child per job."""

    def __init__(self, work: Path, open_clip_config: tuple[str, dict[str, Any]]):
        cfg_dir = work / "clipcfg"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps([*open_clip_config, str(cfg_dir)])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        self.work = work
        self.n = 0
        assert json.loads(self._read())["ready"]

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        return line

    def run(self, argv: list[str], root: Path, **opts: Any) -> Answer:
        self.n += 1
        err = self.work / f"stderr-{self.n}.txt"
        req = {"argv": argv, "root": str(root), "stderr": str(err), **opts}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ans = json.loads(self._read())
        text = err.read_text(errors="replace") if err.exists() else ""
        err.unlink(missing_ok=True)
        return Answer(ans["rc"], ans["signal"], ans["seconds"], text)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(30)


def run_child(req: dict[str, Any]) -> int:
    """In the forked child: inject, run the CLI, return its exit code (a SIGKILL never returns)."""
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    os.dup2(err, 1)
    os.close(err)
    if req.get("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(req["fsize"]), resource.RLIM_INFINITY))
    inject = req.get("inject") or {}
    inj = Injector(req["root"], inject.get("event"), inject.get("action", "kill"), bool(req.get("trace")))
    inj.install(bool(req.get("no_exchange")))
    from indexer.cli import main

    try:
        rc = main(req["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    inj.off = True
    if req.get("trace"):
        with open(req["trace"], "w") as fh:
            for kind, rel in inj.events:
                fh.write(json.dumps([kind, rel]) + "\n")
    return rc


def serve() -> None:
    """The fork server loop (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import faiss  # noqa: F401
    import torch  # noqa: F401

    import indexer.cli
    import indexer.local_engine
    import indexer.pipeline  # noqa: F401
    from retrieval.encoders.open_clip_backbone import register_open_clip_config  # before open_clip: torch compat

    name, config, cfg_dir = json.loads(sys.argv[1])
    register_open_clip_config(name, config, cfg_dir)  # imports open_clip
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                rc = run_child(req)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        if req.get("kill_after_s") is not None:
            deadline = t0 + float(req["kill_after_s"])
            while time.perf_counter() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.002)
            else:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
        else:
            _, status = os.waitpid(pid, 0)
        answer = {
            "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
