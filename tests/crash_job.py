"""A job for the crash tests, run as a subprocess: ``python tests/crash_job.py '<json>'``.

The JSON gives the job's arguments and a kill point (``kill_when``): at the N-th ``os.fsync`` of a file whose path
contains every given string, the process sends itself SIGKILL (no cleanup, no ``finally``: a real crash).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def install_kill_point(kill_when: dict | None) -> None:
    if not kill_when:
        return
    real_fsync = os.fsync
    seen = {"n": 0}

    def fsync(fd: int) -> None:
        real_fsync(fd)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if all(part in path for part in kill_when["path_contains"]):
            seen["n"] += 1
            if seen["n"] == kill_when.get("nth", 1):
                os.kill(os.getpid(), signal.SIGKILL)

    os.fsync = fsync


def main() -> None:
    spec = json.loads(sys.argv[1])
    install_kill_point(spec.get("kill_when"))
    from indexer.pipeline import build_index
    from indexer.settings import IndexerSettings
    from retrieval.encoders.factory import register_open_clip_config
    from retrieval.settings import EncoderSettings

    name, config = spec["open_clip_config"]
    register_open_clip_config(name, config, Path(spec["args"]["out"]).parent)
    a = spec["args"]
    enc = EncoderSettings(name=f"open_clip:{name}:{a['ckpt']}", precision="fp32", device="cpu")
    settings = IndexerSettings(encoder=enc, batch_size=4, workers=0, shard_size=3, progress=False)
    build_index(a["src"], a["out"], settings)


if __name__ == "__main__":
    main()
