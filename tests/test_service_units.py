"""Small pieces of the service: settings from env and CLI, error->status map, caches, token buckets, JSON logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from retrieval import errors as core_errors
from service.engine import LRUCache, normalize_query
from service.errors import STATUS, PayloadTooLarge, RateLimited, status_for
from service.main import parse_args
from service.middleware import TokenBuckets
from service.observability import JsonFormatter
from service.settings import RateLimitSettings, ServiceSettings


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("SERVICE_INDEX_DIR", "/srv/idx")
    monkeypatch.setenv("SERVICE_ENCODER__NAME", "clip-vit-b-32")
    monkeypatch.setenv("SERVICE_RATE_LIMIT__ENABLED", "true")
    monkeypatch.setenv("SERVICE_API_KEYS", '["a", "b"]')
    monkeypatch.setenv("SERVICE_MAX_BATCH", "8")
    s = ServiceSettings()
    assert s.index_dir == Path("/srv/idx") and s.encoder.name == "clip-vit-b-32" and s.rate_limit.enabled
    assert [k.get_secret_value() for k in s.api_keys] == ["a", "b"] and "'a'" not in repr(s)
    assert s.max_batch == 8


def test_settings_limits_are_validated():
    with pytest.raises(ValueError):
        ServiceSettings(max_top_k=0)
    with pytest.raises(ValueError):
        ServiceSettings(max_query_chars=10**6)


def test_cli_overrides_env(monkeypatch):
    monkeypatch.setenv("SERVICE_PORT", "9000")
    monkeypatch.setenv("SERVICE_ENCODER__PRECISION", "fp32")
    s = parse_args(["/x/idx", "--encoder", "open_clip:ViT-B-32", "--no-batching", "--max-batch", "4"])
    assert s.index_dir == Path("/x/idx") and s.port == 9000 and not s.batching and s.max_batch == 4
    assert s.encoder.name == "open_clip:ViT-B-32" and s.encoder.precision == "fp32"


def test_every_domain_error_has_one_status():
    classes = [c for c in vars(core_errors).values()
               if isinstance(c, type) and issubclass(c, core_errors.RetrievalError)]
    for cls in classes:
        assert cls in STATUS, f"{cls.__name__} has no HTTP status"
    assert status_for(core_errors.BadQuery("x")) == 422
    assert status_for(core_errors.UnknownId("x")) == 404
    assert status_for(core_errors.Overloaded("x")) == 429
    assert status_for(core_errors.IndexEncoderMismatch("x")) == 409
    assert status_for(PayloadTooLarge("x")) == 413 and status_for(RateLimited("x")) == 429


def test_lru_cache():
    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)  # evicts b, the least recently used
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    assert (c.hits, c.misses) == (3, 1)
    off = LRUCache(0)
    off.put("a", 1)
    assert off.get("a") is None


def test_normalize_query():
    assert normalize_query("  a\tdog \n in  snow ") == "a dog in snow"
    assert normalize_query("ｆｕｌｌ width") == "full width"
    assert normalize_query(" \u3000 ") == ""
    assert normalize_query("Dog") == "Dog"  # case kept


def test_token_buckets_refill_and_evict():
    b = TokenBuckets(RateLimitSettings(enabled=True, per_second=2, burst=2, max_clients=2))
    assert [b.allow("x", now=0.0) for _ in range(3)] == [True, True, False]
    assert b.allow("x", now=0.5)  # one token back after 0.5 s at 2/s
    assert not b.allow("x", now=0.5)
    b.allow("y", now=1.0)
    b.allow("z", now=1.0)  # x is dropped (max_clients=2) and starts full again
    assert b.allow("x", now=1.0) and b.allow("x", now=1.0)


def test_json_log_lines():
    rec = logging.LogRecord("service.access", logging.INFO, __file__, 1, "request", None, None)
    rec.status = 200
    rec.path = "/api/search"
    line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == "request" and line["status"] == 200 and line["path"] == "/api/search"
    assert line["level"] == "info" and line["ts"].endswith("Z")
