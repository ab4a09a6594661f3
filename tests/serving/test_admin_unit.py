"""The admin API (``agent.serving.admin``) on its own, over the real operations layer and a
real deployer (``tests.models.harness``): who may call, what each route means, what a bad
request gets. No server, no socket: the uid is what SO_PEERCRED would have said."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from agent.errors import NotFoundError
from agent.models.lifecycle import ProbationPolicy
from agent.operations import Operations
from agent.serving.admin import AdminApi, peer_uid, route
from tests.models.harness import Harness, install

ME = os.getuid()


@pytest.mark.parametrize(
    ("path", "body", "command", "args"),
    [
        ("/agent/update", {}, "check-update", {"wait": True}),
        ("/agent/models/m/rollback", {"to": 2}, "rollback", {"to": 2, "model": "m"}),
        ("/agent/models/m/rollback?x=1", {}, "rollback", {"model": "m"}),
        ("/agent/models/m/pin", {"version": 3}, "pin", {"version": 3, "model": "m"}),
        ("/agent/models/m/pin", {"version": None}, "unpin", {"model": "m"}),
        ("/agent/models/m/unpin", {}, "unpin", {"model": "m"}),
        ("/agent/models/m/release", {"version": 2}, "release", {"version": 2, "model": "m"}),
    ],
)
def test_routes_name_a_command_and_its_arguments(
    path: str, body: dict[str, object], command: str, args: dict[str, object]
) -> None:
    assert route(path, body) == (command, args)


@pytest.mark.parametrize("path", ["/agent/models/m/delete", "/agent/models/m", "/agent", "/"])
def test_an_unknown_route_is_not_found(path: str) -> None:
    with pytest.raises(NotFoundError, match=f"no admin route {path}"):
        route(path, {})


def test_the_peer_uid_comes_from_the_kernel_on_unix_sockets_only() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_uid(left) == ME
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        assert peer_uid(tcp) is None
    assert peer_uid(None) is None


def test_admin_calls_run_the_operations_with_the_local_policy(tmp_path: Path) -> None:
    """A rollback and a pin by a local admin reach the deployer (an unsigned version allowed,
    as for `edge-agent import`); a uid not allowed and a TCP client are refused before
    anything runs; bad bodies and bad arguments are 400s that name the problem."""

    async def main() -> None:
        h = Harness(tmp_path, ProbationPolicy(window_s=0.2))
        install(h.store, tmp_path, 1, 2.0, signed=False)
        await h.deployer.start()
        await h.committed(1)
        install(h.store, tmp_path, 2, 3.0)
        assert await h.deployer.deploy("scale", 2)
        await h.committed(2)
        admin = AdminApi(Operations(h.deployer).execute, allowed_uids=frozenset({ME}))

        async def call(path: str, body: object, uid: int | None = ME) -> tuple[int, object]:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = await admin.handle(path, raw, uid)
            return response.status, json.loads(response.body)

        # Refused before anything runs: another uid, a TCP client (no uid).
        status, doc = await call("/agent/models/scale/rollback", {}, uid=ME + 1)
        assert status == 403 and f"refused for uid {ME + 1}" in str(doc)
        status, doc = await call("/agent/models/scale/rollback", {}, uid=None)
        assert status == 403 and "refused for a TCP client" in str(doc)
        assert h.serving() == 2
        # Malformed: 400, naming what is wrong; nothing changes.
        status, doc = await call("/agent/models/scale/rollback", b"{not json")
        assert status == 400 and "not JSON" in str(doc)
        status, doc = await call("/agent/models/scale/rollback", [1])
        assert status == 400 and "must be a JSON object" in str(doc)
        status, doc = await call("/agent/models/scale/rollback", {"to": "two"})
        assert status == 400 and "to" in str(doc)
        status, doc = await call("/agent/models/scale/explode", {})
        assert status == 404
        assert h.serving() == 2
        # A local admin may roll back to the unsigned version 1.
        status, doc = await call("/agent/models/scale/rollback", {"to": 1})
        assert (status, doc) == (200, {"model": "scale", "active_version": 1})
        assert h.serving() == 1 and h.stages() == {1: "committed", 2: "rolled_back"}
        status, doc = await call("/agent/models/scale/release", {"version": 2})
        assert (status, doc) == (200, {"model": "scale", "version": 2, "stage": "retired"})
        status, doc = await call("/agent/models/scale/pin", {"version": 1})
        assert (status, doc) == (200, {"model": "scale", "pinned": 1})
        assert h.deployer.pinned("scale") == 1
        status, doc = await call("/agent/models/scale/pin", {"version": None})
        assert (status, doc) == (200, {"model": "scale", "pinned": None})
        assert h.deployer.pinned("scale") is None
        # This agent has no update loop: asked for a cycle, it says so.
        status, doc = await call("/agent/update", {})
        assert status == 403 and "no repository configured" in str(doc)
        # A command for an unknown model is not found.
        status, doc = await call("/agent/models/nope/rollback", {})
        assert status == 404
        await h.deployer.close()
        h.close()

    asyncio.run(main())
