"""The offline kit: docker/requirements.py, docker/offline/ (PEP 503 wheelhouse, base and gateway image scripts) and
docker-compose.offline.yml (host networking, local images, a second replica). No Docker engine needed: the
wheelhouse is checked with the real pip against a loopback HTTP server, the scripts with shellcheck, the compose
override with Compose v2 itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.util
import io
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_support import COMPOSE, COMPOSE_OFFLINE, DOCKER, ROOT, compose_config, tool

OFFLINE = DOCKER / "offline"
SCRIPTS = [DOCKER / "gateway-start.sh", *sorted(OFFLINE.glob("*.sh"))]


def load_script(path: Path) -> Any:
    """Import a standalone script (docker/ is no package) by its path."""
    spec = importlib.util.spec_from_file_location(f"deploy_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pep503 = load_script(OFFLINE / "pep503.py")
requirements = load_script(DOCKER / "requirements.py")


# ---------------------------------------------------------------------------------------------------------------
# docker/requirements.py: what the images install
# ---------------------------------------------------------------------------------------------------------------


def test_requirements_are_pyprojects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = requirements.requirements(ROOT / "pyproject.toml", ["cpu"])
    assert reqs == project["dependencies"] + project["optional-dependencies"]["cpu"]
    assert "torch==2.13.0" in reqs and any(r.startswith("faiss-cpu") for r in reqs)
    assert requirements.requirements(ROOT / "pyproject.toml", []) == project["dependencies"]


def test_requirements_cli_refuses_an_unknown_extra() -> None:
    res = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), "cpu,nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "nope" in res.stderr and res.stdout == ""
    res = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), "gpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and any(line.startswith("faiss-gpu") for line in res.stdout.splitlines())


# ---------------------------------------------------------------------------------------------------------------
# PEP 503 wheelhouse
# ---------------------------------------------------------------------------------------------------------------


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal valid pure-Python wheel (METADATA, WHEEL, RECORD and one module)."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{name.replace('-', '_')}.py": b"VALUE = 1\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in files) + f"{dist}.dist-info/RECORD,,\n"
    path = folder / f"{dist}-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p, data in files.items():
            zf.writestr(p, data)
        zf.writestr(f"{dist}.dist-info/RECORD", record)
    path.write_bytes(buf.getvalue())
    return path


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_pep503_index_layout(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    wheel = make_wheel(tmp_path / "files", "Demo.Pkg", "1.0")
    (tmp_path / "files" / "other_pkg-2.0.tar.gz").write_bytes(b"sdist")
    (tmp_path / "files" / "notes.txt").write_text("not a distribution")
    projects = pep503.write_index(tmp_path)
    assert projects == {"demo-pkg": [wheel.name], "other-pkg": ["other_pkg-2.0.tar.gz"]}
    root_page = (tmp_path / "simple" / "index.html").read_text()
    assert 'href="demo-pkg/"' in root_page and 'href="other-pkg/"' in root_page and "notes" not in root_page
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    page = (tmp_path / "simple" / "demo-pkg" / "index.html").read_text()
    assert f'href="../../files/{wheel.name}#sha256={digest}"' in page


def test_pep503_refuses_an_empty_wheelhouse(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(OFFLINE / "pep503.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1 and "no wheels or sdists" in res.stderr
    assert not (tmp_path / "simple").exists()


def test_pip_installs_from_the_wheelhouse_over_http(tmp_path: Path) -> None:
    """The real pip, the index served the way docs/DEPLOY.md says (a static HTTP server on 127.0.0.1)."""
    house = tmp_path / "wheelhouse"
    (house / "files").mkdir(parents=True)
    make_wheel(house / "files", "offline-demo", "1.0")
    make_wheel(house / "files", "offline-demo", "1.1")
    pep503.write_index(house)
    target = tmp_path / "target"
    with serve(house) as url:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--isolated", "--no-cache-dir", "--index-url", f"{url}/simple",
             "--target", str(target), "offline-demo==1.0"],
            capture_output=True, text=True, timeout=120,
        )
    assert res.returncode == 0, res.stdout + res.stderr
    assert (target / "offline_demo.py").is_file()
    assert (target / "offline_demo-1.0.dist-info").is_dir(), "the pinned version, from the index"

    # a file that does not match its listed digest is refused
    (house / "files" / "offline_demo-1.1-py3-none-any.whl").write_bytes(b"tampered")
    with serve(house) as url:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--isolated", "--no-cache-dir", "--no-deps", "--index-url",
             f"{url}/simple", "--dest", str(tmp_path / "dl"), "offline-demo==1.1"],
            capture_output=True, text=True, timeout=120,
        )
    assert res.returncode != 0 and "hash" in (res.stdout + res.stderr).lower()


# ---------------------------------------------------------------------------------------------------------------
# The shell scripts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    res = subprocess.run([tool("shellcheck"), "--severity=info", str(script)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_offline_scripts_do_what_the_issue_asks() -> None:
    base = (OFFLINE / "base-image.sh").read_text()
    assert "debootstrap --variant=minbase" in base and "docker import" in base
    assert "EXTRA_CA" in base and "update-ca-certificates" in base, "a proxy's CA can be added"
    assert "apt-get clean" in base and "/var/lib/apt/lists/*" in base, "apt caches are removed"
    house = (OFFLINE / "wheelhouse.sh").read_text()
    assert "pip download" in house and "pep503.py" in house and "requirements.py" in house
    assert "Dockerfile.gateway" in (OFFLINE / "gateway-image.sh").read_text()


# ---------------------------------------------------------------------------------------------------------------
# docker-compose.offline.yml
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline() -> dict[str, Any]:
    return compose_config([COMPOSE, COMPOSE_OFFLINE], profiles=["index", "replica2"])


def test_offline_stack_uses_the_host_network(offline: dict[str, Any]) -> None:
    services = offline["services"]
    assert set(services) == {"gateway", "service", "service-2", "indexer"}
    for name in ("gateway", "service", "service-2"):
        assert services[name]["network_mode"] == "host", name
        assert not services[name].get("ports"), f"{name}: host networking publishes nothing"
    assert services["indexer"]["network_mode"] == "none"
    assert "networks" not in offline or not offline["networks"], "no compose (bridge) network is created"


def test_offline_builds_from_local_sources(offline: dict[str, Any]) -> None:
    services = offline["services"]
    for name in ("service", "indexer"):
        build = services[name]["build"]
        assert build["network"] == "host"
        assert build["args"]["PYTHON_IMAGE"] == "local/python:3.11-slim-bookworm"
        assert build["args"]["PIP_INDEX_URL"].startswith("http://127.0.0.1:")
        assert build["args"]["TORCH_INDEX_URL"] == build["args"]["PIP_INDEX_URL"]
        assert build["dockerfile"] == "docker/Dockerfile"
    gateway = services["gateway"]
    assert "unprivileged" not in gateway["image"]
    assert Path(gateway["build"]["context"]) == DOCKER
    assert (DOCKER / gateway["build"]["dockerfile"]).is_file()
    assert gateway["build"]["args"]["BASE_IMAGE"] == "local/python:3.11-slim-bookworm"
    assert "build" not in services["service-2"], "the second replica runs the image built for `service`"
    assert services["service-2"]["image"] == services["service"]["image"]


def test_offline_replicas_listen_on_loopback_and_the_gateway_finds_them(offline: dict[str, Any]) -> None:
    services = offline["services"]
    addresses = []
    for name in ("service", "service-2"):
        env = services[name]["environment"]
        assert env["SERVICE_HOST"] == "127.0.0.1", f"{name} must not listen on the host's public interfaces"
        assert env["FORWARDED_ALLOW_IPS"] == "127.0.0.1"
        addresses.append(f"{env['SERVICE_HOST']}:{env['SERVICE_PORT']}")
        index = next(v for v in services[name]["volumes"] if v["target"] == "/index")
        assert index["source"] == "index" and index["read_only"] is True, f"{name} shares the read-only index"
        assert services[name]["read_only"] is True and services[name]["user"] == "10001:10001"
    assert len(set(addresses)) == 2
    assert services["service-2"]["profiles"] == ["replica2"]
    # by default the gateway knows the first replica; the two-replica command in the docs names both
    assert services["gateway"]["environment"]["GATEWAY_UPSTREAMS"] == addresses[0]
    two = compose_config([COMPOSE, COMPOSE_OFFLINE], profiles=["replica2"],
                         env={"GATEWAY_UPSTREAMS": " ".join(addresses)})
    assert two["services"]["gateway"]["environment"]["GATEWAY_UPSTREAMS"].split() == addresses
    depends = services["gateway"]["depends_on"]
    assert depends["service"]["condition"] == depends["service-2"]["condition"] == "service_healthy"
    assert depends["service-2"]["required"] is False, "without the profile the gateway starts all the same"
    docs = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert f'GATEWAY_UPSTREAMS="{" ".join(addresses)}"' in docs


def test_offline_stack_without_the_replica_profile(offline: dict[str, Any]) -> None:
    cfg = compose_config([COMPOSE, COMPOSE_OFFLINE])
    assert set(cfg["services"]) == {"gateway", "service"}
