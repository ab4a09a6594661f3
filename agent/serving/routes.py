"""One router for every route of the local socket: a request target in, a ``Route`` out.

Pure: no sockets, no models. The query string and fragment are dropped before matching (no
route of the protocol gives them a meaning, and stock clients add some, as tritonclient's
``query_params`` do); percent-escapes are decoded in the model name only, after the path is
split, so ``/`` inside a name stays part of the name.
"""

from __future__ import annotations

from enum import Enum
from urllib.parse import unquote

from agent.errors import NotFoundError
from agent.records import record


class Kind(Enum):
    LIVE = "live"
    READY = "ready"
    SERVER = "server"
    METRICS = "metrics"
    STATUS = "status"
    INDEX = "index"
    MODEL = "model"  # model metadata
    MODEL_READY = "model_ready"
    MODEL_CONFIG = "model_config"
    MODEL_STATS = "model_stats"
    INFER = "infer"
    ADMIN = "admin"
    SHM_STATUS = "shm_status"  # system shared memory (agent/serving/shm/)
    SHM_REGISTER = "shm_register"
    SHM_UNREGISTER = "shm_unregister"


# Read per request: an Enum member is reached through its metaclass, slower than a global.
INFER = Kind.INFER


# The method each route answers; HEAD is answered wherever GET is.
METHODS: dict[Kind, str] = {
    Kind.LIVE: "GET",
    Kind.READY: "GET",
    Kind.SERVER: "GET",
    Kind.METRICS: "GET",
    Kind.STATUS: "GET",
    Kind.INDEX: "POST",
    Kind.MODEL: "GET",
    Kind.MODEL_READY: "GET",
    Kind.MODEL_CONFIG: "GET",
    Kind.MODEL_STATS: "GET",
    Kind.INFER: "POST",
    Kind.ADMIN: "POST",
    Kind.SHM_STATUS: "GET",
    Kind.SHM_REGISTER: "POST",
    Kind.SHM_UNREGISTER: "POST",
}

_FIXED = {
    "/v2/health/live": Kind.LIVE,
    "/v2/health/ready": Kind.READY,
    "/v2": Kind.SERVER,
    "/metrics": Kind.METRICS,
    "/agent/status": Kind.STATUS,
    "/v2/repository/index": Kind.INDEX,
}

_ACTIONS = {
    "": Kind.MODEL,
    "ready": Kind.MODEL_READY,
    "config": Kind.MODEL_CONFIG,
    "stats": Kind.MODEL_STATS,
    "infer": Kind.INFER,
}

_MODELS = "/v2/models/"
_SHM = "/v2/systemsharedmemory"
_SHM_ACTIONS = {
    "status": Kind.SHM_STATUS,
    "register": Kind.SHM_REGISTER,
    "unregister": Kind.SHM_UNREGISTER,
}
ADMIN_PREFIX = "/agent/"
MAX_VERSION = 2**63 - 1


@record
class Route:
    kind: Kind
    path: str  # without query string
    model: str = ""
    version: int | None = None
    region: str | None = None  # a shared-memory route's region name (None: all regions)

    def allows(self, method: str) -> bool:
        wanted = METHODS[self.kind]
        return method == wanted or (method == "HEAD" and wanted == "GET")


def path_of(target: str) -> str:
    """The path of a request target: the query string and fragment dropped."""
    for mark in ("?", "#"):
        target = target.split(mark, 1)[0]
    return target


def match(target: str) -> Route:
    """The route of a request target (path, optionally with a query string).

    Raises:
        NotFoundError: no route has this path, naming it.
    """
    path = path_of(target)
    kind = _FIXED.get(path)
    if kind is not None:
        return Route(kind, path)
    if path.startswith(_MODELS):
        return _model_route(path)
    if path.startswith(ADMIN_PREFIX):
        return Route(Kind.ADMIN, path)
    if path.startswith(_SHM + "/"):
        return _shm_route(path)
    raise NotFoundError(f"no route for {path}")


class RouteCache:
    """The routes of recently seen paths (one per server): a client calls the same few paths
    again and again. Bounded in count, and only short paths are kept; a path without a route
    is matched (and refused) every time."""

    MAX_ENTRIES = 256
    MAX_PATH = 256

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def match(self, path: str) -> Route:
        """``match(path)``, remembered.

        Raises:
            NotFoundError: no route has this path, naming it.
        """
        route = self._routes.get(path)
        if route is None:
            route = match(path)
            if len(path) <= self.MAX_PATH:
                if len(self._routes) >= self.MAX_ENTRIES:
                    self._routes.pop(next(iter(self._routes), path), None)
                self._routes[path] = route
        return route

    def __len__(self) -> int:
        return len(self._routes)


def _shm_route(path: str) -> Route:
    """``/v2/systemsharedmemory[/region/{name}]/{status|register|unregister}``."""
    parts = path[len(_SHM) + 1 :].split("/")
    region = None
    if len(parts) == 3 and parts[0] == "region" and parts[1]:
        region = unquote(parts[1], errors="replace")
        parts = parts[2:]
    kind = _SHM_ACTIONS.get(parts[0]) if len(parts) == 1 else None
    if kind is None or (kind is Kind.SHM_REGISTER and region is None):
        raise NotFoundError(f"no route for shared-memory path {path}")
    return Route(kind, path, region=region)


def _model_route(path: str) -> Route:
    """``/v2/models/{m}[/versions/{v}][/action]``."""
    parts = path[len(_MODELS) :].split("/")
    name = unquote(parts[0], errors="replace")
    if not name:
        raise NotFoundError(f"model name missing in path {path}")
    rest = parts[1:]
    version = None
    if len(rest) >= 2 and rest[0] == "versions":
        version = parse_version(rest[1])
        rest = rest[2:]
    action = rest[0] if len(rest) == 1 else ""
    if len(rest) > 1 or action not in _ACTIONS:
        raise NotFoundError(f"no route for model path {path}")
    return Route(_ACTIONS[action], path, name, version)


def parse_version(raw: str) -> int:
    """A version number from a path segment.

    Raises:
        NotFoundError: not a positive decimal integer that fits a version number.
    """
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_VERSION:
        raise NotFoundError(f"model version must be a positive integer, found {raw[:40]!r}")
    return int(raw)
