"""The project client's shared-memory calls: create and register regions, unregister them,
ask their status (a mixin of ``agent.serving.client.InferenceClient``)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.serving.shm.client import LocalRegions, SharedRegion

SHM_PATH = "/v2/systemsharedmemory"


class SharedMemoryCalls:
    """Regions this client registered; the agent drops them with the connection that
    registered them, and the client registers them again on a new one."""

    address: str
    _regions: LocalRegions

    def _json(self, method: str, path: str, body: bytes = b"") -> Any:
        raise NotImplementedError  # the client's

    def create_region(self, name: str, byte_size: int, key: str | None = None) -> SharedRegion:
        """Create a shm object (``key``: a fresh one) and register it as ``name``. On the Unix
        socket it is given to the socket's group (the agent's, which this process is in to
        connect at all), 0660: the agent, its own user, can read inputs and write outputs.
        ``close()`` it (it is unlinked) once it has been unregistered."""
        group = None if self.address.startswith("http://") else Path(self.address).stat().st_gid
        shm_key = key or f"/edge-agent-{os.getpid()}-{secrets.token_hex(6)}"
        region = SharedRegion(name, shm_key, byte_size, group=group)
        try:
            self.register_region(region)
        except BaseException:
            region.close()
            raise
        return region

    def register_region(self, region: SharedRegion) -> None:
        """Register a region this process created: its ``PlacedTensor``s may then be inputs
        of ``infer`` and its ``output_regions``. The agent keeps it while this client's
        connection lasts; the client registers it again on a new connection."""
        self._register(region)
        self._regions.by_name[region.name] = region

    def _register(self, region: SharedRegion) -> None:
        body = {"key": region.key, "offset": 0, "byte_size": region.byte_size}
        path = f"{SHM_PATH}/region/{quote(region.name, safe='')}/register"
        self._json("POST", path, json.dumps(body).encode())

    def unregister_region(self, name: str | None = None) -> None:
        """Unregister ``name``, or every region of this client."""
        path = SHM_PATH if name is None else f"{SHM_PATH}/region/{quote(name, safe='')}"
        self._json("POST", path + "/unregister")
        if name is None:
            self._regions.by_name.clear()
        else:
            self._regions.by_name.pop(name, None)

    def region_status(self) -> list[dict[str, Any]]:
        """The regions the agent holds for this client."""
        result: list[dict[str, Any]] = self._json("GET", SHM_PATH + "/status")
        return result
