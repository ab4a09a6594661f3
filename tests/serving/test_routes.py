"""The router (``agent.serving.routes``): the cache of the paths clients repeat."""

from __future__ import annotations

import pytest

from agent.errors import NotFoundError
from agent.serving import routes


def test_the_route_cache_answers_as_the_router_does() -> None:
    cache = routes.RouteCache()
    for path in [
        "/v2/models/face/infer",
        "/v2/models/face/versions/3/infer",
        "/v2/models/a%2Fb/ready",
        "/v2/health/ready",
        "/v2/models/face/infer",
    ]:
        assert cache.match(path) == routes.match(path)
    assert len(cache) == 4
    assert cache.match("/v2/models/face/versions/3/infer").version == 3


def test_paths_without_a_route_are_refused_every_time_and_not_kept() -> None:
    cache = routes.RouteCache()
    for _ in range(2):
        with pytest.raises(NotFoundError, match="no route for /v3/nope"):
            cache.match("/v3/nope")
        with pytest.raises(NotFoundError, match="version must be a positive integer"):
            cache.match("/v2/models/m/versions/x1/infer")
    assert len(cache) == 0


def test_the_route_cache_is_bounded_in_count_and_path_length() -> None:
    cache = routes.RouteCache()
    long_name = "m" * routes.RouteCache.MAX_PATH
    assert cache.match(f"/v2/models/{long_name}/infer").model == long_name
    assert len(cache) == 0  # too long to keep
    for i in range(routes.RouteCache.MAX_ENTRIES + 50):
        cache.match(f"/v2/models/m{i}/infer")
    assert len(cache) == routes.RouteCache.MAX_ENTRIES
    assert cache.match("/v2/models/m1/infer").model == "m1"  # evicted, matched again
