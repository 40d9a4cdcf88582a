"""Request-scoped access to the objects the lifespan put on ``app.state`` (no module globals), and the API key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import APIKeyHeader

from service.auth import KeyRing
from service.errors import NotReady, Unauthorized
from service.settings import ServiceSettings

if TYPE_CHECKING:  # the engine pulls in torch/faiss; routes only need its types
    from service.batching import Runner
    from service.engine import Searcher
    from service.observability import Metrics


@dataclass
class ServiceState:
    """Everything the routes use, created by the lifespan and stored as ``app.state.service``."""

    settings: ServiceSettings
    metrics: Metrics
    searcher: Searcher | None = None
    text_runner: Runner | None = None
    image_runner: Runner | None = None
    ready: bool = False
    keys: KeyRing = field(default_factory=lambda: KeyRing([]))


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


# The dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, two thread
# hand-offs per search request for a few attribute reads (measured at concurrency 1).
async def get_ready_state(request: Request) -> ServiceState:
    state = get_state(request)
    if not state.ready or state.searcher is None:
        raise NotReady("the service is starting or shutting down")
    return state


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when the service has keys")


def _check_key(state: ServiceState, key: str | None) -> None:
    """Constant-time check against every configured key (:class:`service.auth.KeyRing`)."""
    if state.keys and state.keys.match(key) is None:
        raise Unauthorized("a valid X-API-Key header is required")


async def require_admin_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    """Admin routes: a key from ``api_keys`` when any are configured."""
    _check_key(get_state(request), key)


async def require_search_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    """Search routes: a key only when ``protect_search`` is on."""
    state = get_state(request)
    if state.settings.protect_search:
        _check_key(state, key)


#: The ready service state, for route signatures: ``async def route(state: ReadyState)``.
ReadyState = Annotated[ServiceState, Depends(get_ready_state)]
#: An indexed id in a path (``/images/{item_id:path}``).
ItemId = Annotated[str, Path(min_length=1, max_length=1024, description="an id from the index")]
