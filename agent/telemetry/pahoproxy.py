"""paho-mqtt without its eager ``urllib.request``: loaded only for a proxy lookup that can matter.

paho.mqtt.client imports ``urllib.request`` (with ``http.client`` and ``email``: 1.8 MB of the
daemon's resident memory) for one use: with PySocks installed, each connect looks for an
``mqtt_proxy`` environment variable (``getproxies``, ``proxy_bypass``). The daemon defers that
import (``defer_urllib_request``, before paho is first imported: a stand-in module imports it at
its first attribute access), and each client skips the lookup while no
``*_proxy`` variable is set, where it finds no proxy anyway (``skip_empty_proxy_lookup``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import urllib
from collections.abc import Mapping
from typing import Any

LAZY = "urllib.request"


class _Deferred(types.ModuleType):
    """Stands for ``urllib.request`` until one of its names is asked for: then imports it
    (``import_module`` puts the real module in ``sys.modules`` and on the package) and answers
    from it. An ``import`` statement only reads ``__spec__``, which it has."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(LAZY) is self:
            del sys.modules[LAZY]
        return getattr(importlib.import_module(LAZY), name)


def defer_urllib_request() -> bool:
    """Put a stand-in for ``urllib.request`` that imports it at its first use; False when it
    was already imported (or cannot be found)."""
    if LAZY in sys.modules:
        return False
    spec = importlib.util.find_spec(LAZY)
    if spec is None:
        return False
    stand_in = _Deferred(LAZY)
    stand_in.__spec__ = spec
    sys.modules[LAZY] = stand_in
    urllib.request = stand_in  # type: ignore[attr-defined]  # what `import urllib.request` binds
    return True


def proxy_variables(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether any ``*_proxy`` variable is set: ``urllib.request.getproxies`` finds nothing
    otherwise (on Linux it reads only the environment)."""
    return any(name.lower().endswith("_proxy") for name in environ)


def skip_empty_proxy_lookup(client: Any) -> None:
    """Let ``client`` (a paho Client) look for a proxy only when one was set on it or a
    ``*_proxy`` variable exists: its own lookup answers None otherwise."""
    lookup = getattr(client, "_get_proxy", None)
    if lookup is None:  # another paho: its own behaviour, nothing skipped
        return

    def get_proxy() -> Any:
        if getattr(client, "_proxy", None) or proxy_variables():
            return lookup()
        return None

    client._get_proxy = get_proxy
