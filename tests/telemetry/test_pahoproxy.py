"""paho without its eager urllib.request (agent.telemetry.pahoproxy): not loaded by the import
nor by a connect's proxy lookup when no proxy is set, loaded and used when one is."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from agent.telemetry import pahoproxy

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from agent.telemetry import pahoproxy
    assert pahoproxy.defer_urllib_request()
    import paho.mqtt.client as mqtt
    heavy = ("http.client", "email")
    assert not [m for m in heavy if m in sys.modules], sorted(sys.modules)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pahoproxy.skip_empty_proxy_lookup(client)
    client._host = "broker.example"
    assert client._get_proxy() is None
    assert not [m for m in heavy if m in sys.modules]
    os.environ["mqtt_proxy"] = "socks://proxy.example:1080"
    proxy = client._get_proxy()  # paho's own lookup, urllib.request loaded for it
    if mqtt.socks is None:  # without PySocks paho never uses a proxy
        assert proxy is None
    else:
        assert (proxy["proxy_addr"], proxy["proxy_port"]) == ("proxy.example", 1080), proxy
        assert "http.client" in sys.modules
    import urllib.request
    assert urllib.request.getproxies()["mqtt"] == "socks://proxy.example:1080"
    assert not pahoproxy.defer_urllib_request()  # already there: nothing changed
    print("ok")
    """
)


def test_urllib_request_is_loaded_only_for_a_proxy_lookup_that_can_matter() -> None:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_proxy_variables() -> None:
    assert not pahoproxy.proxy_variables({"PATH": "/bin", "PROXY": "x"})
    assert pahoproxy.proxy_variables({"HTTPS_PROXY": "http://p:3128"})
    assert pahoproxy.proxy_variables({"mqtt_proxy": "socks://p:1080"})
