"""Only the operator, through the dashboard's own page, may use the dashboard: the checks
alone, then each refusal over real HTTP with a real broker watching the commands topic."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import ConfigError
from cloud_stub.dashboard import secretfile
from cloud_stub.dashboard.auth import (
    SESSION_MAX_AGE_S,
    ForeignRequestError,
    Guard,
    NotJsonError,
    NotLoggedInError,
    Request,
    host_names,
)
from cloud_stub.dashboard.server import Dashboard
from cloud_stub.fleet.records import Message
from tests.cloud_stub.dashboard_http import DashboardHttp, running_dashboard
from tests.telemetry.conftest import Broker, Subscriber

PORT = 8080
HOST = f"127.0.0.1:{PORT}"


def guard() -> Guard:
    return Guard("s3cret", PORT, host_names("127.0.0.1", PORT))


def logged_in(g: Guard) -> dict[str, str]:
    """The headers the dashboard's own page sends with a command."""
    cookie = g.login("s3cret").split(";")[0]
    session = g.authorize(Request("GET", "/", {"host": HOST, "cookie": cookie}))
    return {
        "host": HOST,
        "cookie": cookie,
        "origin": f"http://{HOST}",
        "x-csrf-token": session.csrf,
        "content-type": "application/json",
        "sec-fetch-site": "same-origin",
    }


def test_the_page_itself_may_send_a_command() -> None:
    g = guard()
    headers = logged_in(g)
    assert g.authorize(Request("POST", "/api/command", headers)).csrf == headers["x-csrf-token"]
    charset = {**headers, "content-type": "application/json; charset=utf-8"}
    g.authorize(Request("POST", "/api/command", charset))
    # Another dashboard with the same secret (a restart with --token-file) keeps the session.
    guard().authorize(Request("POST", "/api/command", headers))


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"cookie": ""}, NotLoggedInError, "not logged in"),
        ({"cookie": "edge_dashboard_8080=abc.def"}, NotLoggedInError, "not logged in"),
        ({"cookie": "edge_dashboard_9090=x"}, NotLoggedInError, "not logged in"),
        ({"x-csrf-token": ""}, ForeignRequestError, "X-CSRF-Token"),
        ({"x-csrf-token": "0" * 64}, ForeignRequestError, "X-CSRF-Token"),
        ({"origin": ""}, ForeignRequestError, "no Origin header"),
        ({"origin": "http://127.0.0.1:9999"}, ForeignRequestError, "Origin"),
        ({"origin": "null"}, ForeignRequestError, "Origin"),
        ({"host": "evil.example:8080"}, ForeignRequestError, "Host"),
        ({"host": "127.0.0.1:9999"}, ForeignRequestError, "Host"),
        ({"sec-fetch-site": "same-site"}, ForeignRequestError, "another origin"),
        ({"sec-fetch-site": "cross-site"}, ForeignRequestError, "another origin"),
        ({"content-type": "text/plain"}, NotJsonError, "application/json"),
        ({"content-type": "application/x-www-form-urlencoded"}, NotJsonError, "found"),
        ({"content-type": ""}, NotJsonError, "application/json"),
    ],
)
def test_a_command_is_refused_when(
    change: dict[str, str], error: type[Exception], words: str
) -> None:
    g = guard()
    headers = {k: v for k, v in {**logged_in(g), **change}.items() if v}
    with pytest.raises(error, match=words):
        g.authorize(Request("POST", "/api/command", headers))


def test_reads_need_a_session_and_a_page_of_its_own() -> None:
    g = guard()
    headers = logged_in(g)
    g.authorize(Request("GET", "/api/fleet", headers))
    with pytest.raises(NotLoggedInError):
        g.authorize(Request("GET", "/api/fleet", {"host": HOST}))
    # An <img>/<script> of another origin on this host: the cookie comes along, it is refused.
    for site in ("same-site", "cross-site"):
        with pytest.raises(ForeignRequestError):
            g.authorize(Request("GET", "/events", {**headers, "sec-fetch-site": site}))
    # A link to the page from elsewhere is a navigation: allowed (with the session).
    g.authorize(Request("GET", "/", {**headers, "sec-fetch-site": "cross-site"}))


def test_login_compares_the_secret() -> None:
    g = guard()
    with pytest.raises(NotLoggedInError, match="wrong login token"):
        g.login("s3creT")
    with pytest.raises(NotLoggedInError):
        g.login("")
    cookie = g.login("s3cret")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie


def test_a_session_ends_after_its_max_age() -> None:
    """A cookie replayed outside a browser (a process that received it) is good for one
    working day at most; its issue time is under the MAC, so it cannot be moved."""
    g = guard()
    cookie = g.login("s3cret", now=1_000_000.0).split(";")[0]
    request = Request("GET", "/api/fleet", {"host": HOST, "cookie": cookie})
    g.authorize(request, now=1_000_000.0 + SESSION_MAX_AGE_S)
    for now in (1_000_000.0 + SESSION_MAX_AGE_S + 1, 1_000_000.0 - 3600):
        with pytest.raises(NotLoggedInError, match="the session has ended"):
            g.authorize(request, now=now)
    name, _, value = cookie.partition("=")
    sid, issued, mac = value.split(".")
    moved = f"{name}={sid}.{int(issued) + SESSION_MAX_AGE_S}.{mac}"
    with pytest.raises(NotLoggedInError, match="not logged in"):
        g.authorize(Request("GET", "/", {"host": HOST, "cookie": moved}), now=1_000_000.0)
    assert f"Max-Age={SESSION_MAX_AGE_S}" in g.login("s3cret")


def test_host_names() -> None:
    assert host_names("127.0.0.1", 80) >= {"127.0.0.1", "localhost:80", "[::1]:80"}
    assert host_names("10.0.0.5", 8080, ["dash.example"]) == {
        "10.0.0.5:8080",
        "dash.example:8080",
    }
    assert "0.0.0.0:8080" not in host_names("0.0.0.0", 8080)


def test_the_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "dashboard.token"
    secret = secretfile.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secretfile.load_or_create(path) == secret
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        secretfile.load_or_create(path)
    path.chmod(0o600)
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        secretfile.load_or_create(path)


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[tuple[Dashboard, Broker]]:
    with running_dashboard(tmp_path) as running:
        yield running


def test_every_refusal_over_http(tmp_path: Path, dashboard: tuple[Dashboard, Broker]) -> None:
    board, broker = dashboard
    watch = Subscriber(broker, "edge/+/+/commands", tmp_path / "commands.txt")
    try:
        stranger = DashboardHttp(board.url)
        for path in ("/", "/api/fleet", "/events"):
            status, _, body = stranger.request("GET", path)
            assert status == 401, (path, status)
            assert "not logged in" in json.loads(body)["error"]
        operator = DashboardHttp(board.url)
        status, headers, _ = operator.request("GET", f"/login?token={board.secret}")
        assert status == 303
        assert headers["Location"] == "/"  # the secret leaves the address bar
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert headers["X-Frame-Options"] == "DENY"  # no page frames it (clickjacking)
        status, _, body = stranger.request("GET", "/login?token=guess")
        assert status == 401
        assert "wrong login token" in json.loads(body)["error"]

        operator = DashboardHttp(board.url)
        operator.login(board.secret)
        rollback = {"device": "dev-1", "command": "rollback", "args": {"model": "mm"}}
        refusals = [
            ({"Cookie": ""}, 401, "not logged in"),
            ({"Cookie": f"{board.guard.cookie_name if board.guard else ''}=forged.mac"}, 401, ""),
            ({"X-CSRF-Token": ""}, 403, "X-CSRF-Token"),
            ({"X-CSRF-Token": "wrong"}, 403, "X-CSRF-Token"),
            ({"Origin": ""}, 403, "Origin"),
            ({"Origin": "http://127.0.0.1:1"}, 403, "Origin"),
            ({"Host": "attacker.example"}, 403, "Host"),
            ({"Host": "rebound.example:80"}, 403, "Host"),
            ({"Sec-Fetch-Site": "same-site"}, 403, "another origin"),
            ({"Content-Type": "text/plain"}, 403, "application/json"),
            ({"Content-Type": "application/x-www-form-urlencoded"}, 403, "application/json"),
        ]
        for headers, want, words in refusals:
            status, answer = operator.command(rollback, headers)
            assert status == want, (headers, status, answer)
            assert words in answer["error"], (headers, answer)
        status, _, _ = operator.request(
            "OPTIONS", "/api/command", headers={"Origin": "http://127.0.0.1:1"}
        )
        assert status == 403
        assert watch.lines() == [], "a refused request must publish nothing"

        # A device the dashboard never heard from has no topic it reads: refused, not sent to
        # a guessed fleet.
        status, answer = operator.command({**rollback, "args": {"model": "ok"}})
        assert status == 404 and "never reported" in answer["error"], answer
        board.state.store.ingest([Message("edge/default/dev-1/status", b'{"online": true}')])
        # The page's own request goes through: signed, on the device's command topic. It is
        # the only one: one published by mistake before it would have arrived before it.
        status, answer = operator.command({**rollback, "args": {"model": "ok"}})
        assert status == 200, answer
        deadline = time.monotonic() + 10
        while not watch.lines() and time.monotonic() < deadline:
            time.sleep(0.05)
        [(topic, payload)] = watch.lines()
        assert topic == "edge/default/dev-1/commands"
        assert json.loads(payload)["key_id"] == "ops"
        assert json.loads(payload)["args"] == {"model": "ok"}
    finally:
        watch.close()
