"""The OpenAPI document: snapshot diff (``UPDATE_SNAPSHOTS=1`` rewrites it) and schemathesis fuzzing (no 5xx)."""

from __future__ import annotations

import ast
import difflib
import json
import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from service_support import build_test_index

from service.main import create_app
from service.settings import ServiceSettings

SNAPSHOT = Path(__file__).parent / "snapshots" / "openapi.json"
ROUTES = Path(__file__).resolve().parents[1] / "service" / "api"


def _dump(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_openapi_snapshot(tmp_path):
    doc = create_app(ServiceSettings(index_dir=tmp_path)).openapi()  # the schema needs no index or encoder
    text = _dump(doc)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1" or not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(text, encoding="utf-8")
    old = SNAPSHOT.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), "snapshot", "current", n=2))
    assert not diff, f"the OpenAPI document changed; if on purpose, rerun with UPDATE_SNAPSHOTS=1\n{diff[:6000]}"


def test_every_route_declares_a_response_model(tmp_path):
    app = create_app(ServiceSettings(index_dir=tmp_path))
    paths = app.openapi()["paths"]
    for path, ops in paths.items():
        for method, op in ops.items():
            ok = op["responses"].get("200", {}).get("content", {})
            assert ok, f"{method.upper()} {path} documents no 200 response body"


def test_routes_do_not_import_torch_or_faiss():
    heavy = {"torch", "faiss", "numpy", "open_clip", "retrieval.encoders", "retrieval.index"}
    for file in ROUTES.rglob("*.py"):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not any(n == h or n.startswith(h + ".") for h in heavy), f"{file.name} imports {n}"


# --------------------------------------------------------------------------------------------------------------
# Fuzzing
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_app(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    build_test_index(tiny_encoder, root / "idx", root / "imgs", n=8)
    settings = ServiceSettings(index_dir=root / "idx", max_upload_bytes=32 * 1024, warmup=False, access_log=False)
    return create_app(settings, encoder=tiny_encoder)


FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))


def test_fuzz_no_server_errors(fuzz_app):
    """Every operation, ``FUZZ_EXAMPLES`` generated requests each (valid and invalid): never a 5xx."""
    api = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    seen: dict[str, set[int]] = {}
    for result in api.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            if case.path == "/api/admin/reload" and isinstance(case.body, dict) and case.body.get("index_dir"):
                case.body["index_dir"] = "/nonexistent/" + str(case.body["index_dir"])[:100]  # never load real paths
            response = case.call_and_validate(checks=[not_a_server_error])
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        run()
    print(seen)
    assert len(seen) >= 10, seen
    new = {"POST /api/search", "GET /api/search", "POST /api/search/batch", "POST /api/search/image",
           "GET /api/folders", "GET /api/duplicates", "POST /v1/embeddings", "GET /v1/models"}
    assert new <= set(seen), new - set(seen)
    assert all(code < 500 for codes in seen.values() for code in codes), seen
