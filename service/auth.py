"""Who is calling: API keys compared in constant time, and the client address behind trusted proxies.

- :class:`KeyRing` holds the SHA-256 digests of the configured keys (never the keys themselves) and compares a
  given key against *every* one with :func:`hmac.compare_digest` on equal-length digests: the time taken says
  nothing about which key matched, how long the keys are or how much of one was right.
- :func:`client_address` takes the peer address, or, only when the peer is one of ``trusted_proxies``, the
  right-most address of ``X-Forwarded-For`` that is not itself a trusted proxy (the left part of that header is
  whatever the client wrote, so it is never believed).
- :func:`client_identity` is what the rate limiter keys on: a *valid* key's slot, else the client address. A
  made-up key per request therefore buys no fresh bucket.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

from pydantic import SecretStr

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class KeyRing:
    """The service's API keys (see the module docstring). ``bool(ring)``: whether any key is configured."""

    def __init__(self, keys: Sequence[SecretStr | str]):
        self._digests = [
            hashlib.sha256((k.get_secret_value() if isinstance(k, SecretStr) else k).encode()).digest() for k in keys
        ]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, given: str | bytes | None) -> int | None:
        """The position of the configured key equal to ``given``, or None. Every key is compared, always."""
        if given is None:
            given = b""
        digest = hashlib.sha256(given.encode() if isinstance(given, str) else given).digest()
        found = None
        for i, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known) and found is None:
                found = i
        return found


class TrustedProxies:
    """Addresses or networks (``"10.0.0.1"``, ``"10.0.0.0/8"``, ``"::1"``) whose forwarded headers are believed."""

    def __init__(self, entries: Iterable[str]):
        self.networks: list[IPNetwork] = [ipaddress.ip_network(e.strip(), strict=False) for e in entries]

    def __contains__(self, address: object) -> bool:
        ip = _ip(address)
        return ip is not None and any(ip in net for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)


def _ip(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(text, str):
        return None
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def header_values(scope: MutableMapping[str, Any], name: bytes) -> list[str]:
    """Every value of header ``name`` (lower case) in an ASGI scope, decoded as latin-1."""
    return [v.decode("latin-1") for k, v in scope.get("headers", []) if k == name]


def client_address(scope: MutableMapping[str, Any], trusted: TrustedProxies) -> str:
    """The caller's address (see the module docstring); ``"unknown"`` when the server gives none."""
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    if not trusted or peer not in trusted:
        return peer
    hops = [h.strip() for value in header_values(scope, b"x-forwarded-for") for h in value.split(",")]
    for hop in reversed(hops):
        if _ip(hop) is None:
            break  # a malformed entry: nothing to its left can be trusted either
        if hop not in trusted:
            return str(_ip(hop))
    return peer


def client_identity(scope: MutableMapping[str, Any], keys: KeyRing, trusted: TrustedProxies) -> str:
    """``"key:N"`` for a request carrying the N-th configured key, else ``"ip:ADDRESS"``."""
    if keys:
        for value in header_values(scope, b"x-api-key"):
            slot = keys.match(value)
            if slot is not None:
                return f"key:{slot}"
    return "ip:" + client_address(scope, trusted)
