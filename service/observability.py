"""Prometheus metrics (one registry per app, no process globals) and JSON log formatting."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LOG_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class Metrics:
    """The service's metrics, registered on their own :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "encoder_batch_size", "items per encoder call", ["queue"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "encoder_batch_seconds", "seconds per encoder batch (encode + search)", ["queue"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=self.registry,
        )
        self.queue_depth = Gauge("queue_depth", "requests waiting for the encoder", ["queue"], registry=self.registry)
        self.cache = Gauge("query_cache_lookups", "query embedding cache lookups so far", ["result"],
                           registry=self.registry)
        self.index_vectors = Gauge("index_vectors", "vectors in the loaded index", registry=self.registry)
        self.index_generation = Gauge("index_generation", "index reloads so far + 1", registry=self.registry)
        self.rejected = Counter("requests_rejected_total", "requests refused", ["reason"], registry=self.registry)

    def batch_observer(self, queue: str):
        def observe(size: int, seconds: float) -> None:
            self.batch_size.labels(queue).observe(size)
            self.batch_seconds.labels(queue).observe(seconds)

        return observe


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _LOG_RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", json_logs: bool = True) -> None:
    """Route the root logger (and uvicorn's) to stderr, as JSON lines or plain text. Called by ``main()`` only."""
    handler = logging.StreamHandler(sys.stderr)
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler.setFormatter(JsonFormatter() if json_logs else plain)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # the service writes its own access log
