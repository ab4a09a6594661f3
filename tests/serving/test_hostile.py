"""Hostile and buggy local clients: one of them never hangs, starves or confuses the others.

Every test talks raw HTTP/1.1 to a real agent (real ONNX Runtime sessions) over its Unix socket
and, where the listener matters, its loopback TCP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.daemon import LocalModel
from agent.errors import UnavailableError
from agent.serving.client import InferenceClient
from agent.serving.connection import HttpConnection, Phase
from agent.serving.oip import client as oip_client

from .conftest import RunningAgent, start_agent
from .test_wire_models import slow_model
from .wire import Wire, request, wait_until

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A few MatMuls of [256, 256]: long enough to still be in the pool when the next
    # pipelined request is decoded, short enough for many runs.
    return slow_model(tmp_path_factory.mktemp("hostile") / "slow.onnx", n=256, depth=64)


def _agent(tmp_path: Path, matmul: Path, slow: Path, **serving: Any) -> Iterator[RunningAgent]:
    models = [LocalModel("m", matmul), LocalModel("slow", slow)]
    serving.setdefault("inline_threshold_us", 0.0)  # every run goes through the pool
    serving.setdefault("workers", 2)
    yield from start_agent(models, tmp_path / "agent.sock", **serving)


@pytest.fixture
def agent(tmp_path: Path, matmul_onnx: Path, slow_onnx: Path) -> Iterator[RunningAgent]:
    yield from _agent(tmp_path, matmul_onnx, slow_onnx)


def infer_json(model: str, feeds: dict[str, np.ndarray[Any, Any]], **headers: str) -> bytes:
    body, _ = oip_client.encode_infer_request(feeds, None, binary=False)
    return request("POST", f"/v2/models/{model}/infer", body, headers)


def batch2() -> bytes:
    return infer_json("m", {"x": np.ones((2, 64), np.float32)})


def slow_request() -> bytes:
    return infer_json("slow", {"x": np.ones((1, 256), np.float32)})


def leases(served: RunningAgent, model: str) -> int:
    active = served.agent.slots.get(model).active
    assert active is not None
    return active.leases


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_INFER = {
    "datatype-object": (
        b'{"inputs":[{"name":"x","datatype":{},"shape":[1,64],"data":[0]}]}',
        400,
        "unknown datatype {}",
    ),
    "datatype-list": (
        b'{"inputs":[{"name":"x","datatype":[],"shape":[1,64],"data":[0]}]}',
        400,
        "unknown datatype []",
    ),
    "huge-dimension": (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[0,' + str(10**30).encode() + b"],"
        b'"data":[]}]}',
        413,
        "dimension 1000000000000000000000000000000 exceeds",
    ),
    "deep-json": (
        ('{"inputs":' + _deep(200_000) + "}").encode(),
        400,
        "nested deeper than the decoder allows",
    ),
    "deep-data": (
        (
            '{"inputs":[{"name":"x","datatype":"FP32","shape":[1,64],"data":' + _deep(900) + "}]}"
        ).encode(),
        400,
        "'data' is ragged or malformed",
    ),
    "lone-surrogate": (
        b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}',
        400,
        "lone surrogate",
    ),
    "huge-integer": (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,64],"data":[' + b"9" * 5000 + b"]}]}",
        400,
        "",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INFER))
def test_undecodable_request_behind_one_in_the_pool_is_answered_in_order(
    agent: RunningAgent, case: str
) -> None:
    """The issue's repro: a valid request still running in the pool, then one whose decoding
    raised something other than an agent error: 200, then a precise 4xx, then the connection
    serves the next request; no lease is left behind."""
    body, status, needle = BAD_INFER[case]
    with Wire(agent.socket) as wire:
        wire.send(slow_request() + request("POST", "/v2/models/m/infer", body) + batch2())
        first = wire.read()
        assert first.status == 200, first.body[:300]
        assert first.json()["model_name"] == "slow"
        bad = wire.read()
        assert bad.status == status, bad.body[:300]
        message = bad.json()["error"]
        assert needle in message
        assert "callback" not in message
        after = wire.read()
        assert after.status == 200
        assert after.json()["outputs"][0]["shape"] == [2, 64]
    wait_until(lambda: leases(agent, "m") == 0 and leases(agent, "slow") == 0)


def test_deep_json_to_the_repository_index(agent: RunningAgent) -> None:
    with Wire(agent.socket) as wire:
        body = _deep(200_000).encode()
        wire.send(
            slow_request()
            + request("POST", "/v2/repository/index", body)
            + request("GET", "/v2/health/live")
        )
        assert wire.read().status == 200
        index = wire.read()
        assert index.status == 400
        assert "repository index body is not JSON" in index.json()["error"]
        assert wire.read().json() == {"live": True}


def test_garbage_after_a_request_in_the_pool(agent: RunningAgent) -> None:
    """Answers leave in request order, all of them, then the parser's 400, then the close."""
    with Wire(agent.socket) as wire:
        wire.send(slow_request() + batch2() + b"GARBAGE\r\n\r\n" + batch2())
        assert wire.read().json()["model_name"] == "slow"
        assert wire.read().json()["outputs"][0]["shape"] == [2, 64]
        error = wire.read()
        assert error.status == 400
        assert error.headers["connection"] == "close"
        assert "malformed HTTP request" in error.json()["error"]
        assert wire.closed()


def test_query_strings_are_ignored_on_every_route(agent: RunningAgent) -> None:
    with Wire(agent.socket) as wire:
        body, _ = oip_client.encode_infer_request(
            {"x": np.ones((1, 64), np.float32)}, None, binary=False
        )
        wire.send(request("POST", "/v2/models/m/infer?x=1&trace=1", body))
        assert wire.read().status == 200
        for path in (
            "/v2/health/ready?verbose=1",
            "/v2/health/live?",
            "/v2?x",
            "/v2/models/m?x=1",
            "/v2/models/m/versions/1/ready?x=1",
            "/v2/models/m/config?x=1",
            "/agent/status?pretty=1",
            "/metrics?name[]=x",
        ):
            wire.send(request("GET", path))
            answer = wire.read()
            assert answer.status == 200, (path, answer.body[:200])
        wire.send(request("POST", "/v2/repository/index?ready=1", b"{}"))
        assert wire.read().status == 200


def test_tritonclient_with_query_params(agent: RunningAgent) -> None:
    tritonclient = pytest.importorskip("tritonclient.http")
    client = tritonclient.InferenceServerClient(agent.http.removeprefix("http://"))
    x = np.ones((1, 64), np.float32)
    inp = tritonclient.InferInput("x", [1, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("m", [inp], query_params={"trace": "1"})
    assert result.as_numpy("y").shape == (1, 64)
    assert client.is_server_ready(query_params={"verbose": "1"})
    client.close()


@pytest.mark.parametrize("listener", ["unix", "tcp"])
def test_head_answers_have_no_body(agent: RunningAgent, listener: str) -> None:
    """A HEAD answer carries GET's headers and no body, whatever its status, so a pipelining
    client reads the next status line where it should be."""
    address = agent.socket if listener == "unix" else agent.http
    with Wire(address) as wire:
        wire.send(
            request("HEAD", "/v2/health/live")
            + request("HEAD", "/v2/models/m/infer")
            + request("HEAD", "/v2/no/such/route")
            + request("HEAD", "/v2/models/m")
            + request("GET", "/v2/health/live")
        )
        live = wire.read("HEAD")
        assert live.status == 200
        assert int(live.headers["content-length"]) == len(b'{"live":true}')
        assert wire.read("HEAD").status == 405
        assert wire.read("HEAD").status == 404
        assert wire.read("HEAD").status == 200
        assert wire.read().json() == {"live": True}


def test_ready_of_an_unknown_version_is_404_like_its_metadata(agent: RunningAgent) -> None:
    with Wire(agent.socket) as wire:
        wire.send(request("GET", "/v2/models/m/versions/7/ready"))
        ready = wire.read()
        wire.send(request("GET", "/v2/models/m/versions/7"))
        metadata = wire.read()
        wire.send(request("GET", "/v2/models/m/versions/1/ready"))
        known = wire.read()
        wire.send(request("GET", f"/v2/models/m/versions/{2**64}/ready"))
        huge = wire.read()
    assert (ready.status, metadata.status, known.status, huge.status) == (404, 404, 200, 404)
    assert "no loaded version 7" in ready.json()["error"]


# -- deadlines -------------------------------------------------------------------------------


@pytest.fixture
def strict(tmp_path: Path, matmul_onnx: Path, slow_onnx: Path) -> Iterator[RunningAgent]:
    yield from _agent(
        tmp_path,
        matmul_onnx,
        slow_onnx,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
        idle_timeout_s=0.5,
    )


@pytest.mark.parametrize("listener", ["unix", "tcp"])
def test_a_stalled_head_gets_408(strict: RunningAgent, listener: str) -> None:
    address = strict.socket if listener == "unix" else strict.http
    with Wire(address) as wire:
        wire.send(b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
        answer = wire.read()
        assert answer.status == 408
        assert "request head not received within 0.5 s" in answer.json()["error"]
        assert wire.closed()


def test_a_dripped_head_gets_408(strict: RunningAgent) -> None:
    """Every byte used to restart the idle timer: a byte every 50 ms kept a slot for ever."""
    payload = b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
    with Wire(strict.socket) as wire:
        for byte in payload:
            try:
                wire.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            wire.sock.settimeout(0.05)
            try:
                if wire._fill():
                    break
            except TimeoutError:
                continue
            break
        wire.sock.settimeout(10)
        answer = wire.read()
        assert answer.status == 408


def test_a_stalled_body_gets_408(strict: RunningAgent) -> None:
    with Wire(strict.socket) as wire:
        wire.send(b'POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{"in')
        answer = wire.read()
        assert answer.status == 408
        assert "request body not received" in answer.json()["error"]


def test_idle_keep_alive_and_silent_connections_are_closed(strict: RunningAgent) -> None:
    with Wire(strict.socket) as wire, Wire(strict.socket) as silent:
        wire.send(request("GET", "/v2/health/live"))
        assert wire.read().status == 200
        assert wire.closed()
        assert silent.closed()


def test_a_slow_model_is_no_deadline(strict: RunningAgent) -> None:
    """Deadlines are the client's: a request in hand is never cut, however long it runs."""
    with Wire(strict.socket) as wire:
        wire.send(b"".join(slow_request() for _ in range(12)))
        for _ in range(12):
            assert wire.read().status == 200


# -- connection slots -------------------------------------------------------------------------


@pytest.fixture
def crowded(tmp_path: Path, matmul_onnx: Path, slow_onnx: Path) -> Iterator[RunningAgent]:
    yield from _agent(
        tmp_path,
        matmul_onnx,
        slow_onnx,
        max_connections=8,
        max_connections_per_peer=6,
        header_timeout_s=60.0,
    )


def _stall(address: str | Path, count: int) -> list[Wire]:
    wires = []
    for _ in range(count):
        wire = Wire(address)
        wire.send(b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
        wires.append(wire)
    return wires


def _stalled_read(server: Any, listener: str, opened: int) -> bool:
    """The server has accepted the ``opened`` connections so far and read every half head."""
    return server.accepted >= opened and all(
        c.phase is not Phase.IDLE for c in list(server._connections) if c.listener == listener
    )


@pytest.mark.parametrize("listener", ["unix", "tcp"])
def test_stalled_connections_give_way_to_new_clients(crowded: RunningAgent, listener: str) -> None:
    """Many more stalled connections than slots: a client that opens a new connection per
    request is always served, and the server never holds more than its budget."""
    address = crowded.socket if listener == "unix" else crowded.http
    server = crowded.agent.server
    stalled = _stall(address, 30)
    try:
        wait_until(lambda: _stalled_read(server, listener, 30))
        for round_ in range(30):
            with Wire(address) as wire:
                wire.send(request("GET", "/v2/health/ready", headers={"Connection": "close"}))
                assert wire.read().status == 200
            stalled += _stall(address, 1)
            opened = 30 + 2 * (round_ + 1)
            wait_until(lambda: _stalled_read(server, listener, opened))  # noqa: B023
            # The weakest give way a moment after a newcomer over the budget.
            wait_until(lambda: server.admission.count(listener) <= 8)
            # Over the budget of 8 only for the moment before the stalled ones give way.
            assert crowded.agent.server.connection_count <= 2 * 8
        wait_until(lambda: server.admission.count(listener) <= 8)
        evicted = [wire for wire in stalled if wire.ended(wait_s=0.2)]
        assert len(evicted) >= len(stalled) - 8
    finally:
        for wire in stalled:
            wire.sock.close()


def _busy(served: RunningAgent, listener: str, count: int) -> list[Wire]:
    """``count`` connections of ``listener``, each with five slow requests in hand, once the
    server holds them all as working."""
    address = served.socket if listener == "unix" else served.http
    busy = [Wire(address, timeout_s=60) for _ in range(count)]
    for wire in busy:
        wire.send(b"".join(slow_request() for _ in range(5)))
    server = served.agent.server
    wait_until(
        lambda: (
            sum(1 for c in list(server._connections) if c.listener == listener and not c.idle)
            == count
        )
    )
    return busy


def test_tcp_clients_cannot_take_the_unix_sockets_slots(crowded: RunningAgent) -> None:
    """TCP's slots (twice its budget of 8) full of requests in hand: a TCP newcomer is refused
    (503), while the Unix socket's clients are served."""
    busy = _busy(crowded, "tcp", 16)
    try:
        with Wire(crowded.http) as newcomer:
            refused = newcomer.read()
        assert refused.status == 503
        assert "can give way yet" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        with Wire(crowded.socket, timeout_s=60) as local:
            local.send(request("GET", "/v2/health/live"))
            assert local.read().status == 200
        for wire in busy:
            for _ in range(5):
                assert wire.read().status == 200
    finally:
        for wire in busy:
            wire.sock.close()


def test_one_peer_cannot_take_every_unix_slot(crowded: RunningAgent) -> None:
    """Twelve connections of one uid with requests in hand fill twice that uid's budget of 6:
    its next is refused naming the uid, though the listener (16 at most) still has room."""
    busy = _busy(crowded, "unix", 12)
    try:
        with Wire(crowded.socket) as newcomer:
            refused = newcomer.read()
        assert refused.status == 503
        assert f"uid {os.getuid()} already has 12 connections, none" in refused.json()["error"]
        for wire in busy:
            for _ in range(5):
                assert wire.read().status == 200
    finally:
        for wire in busy:
            wire.sock.close()


# -- buffered bodies ------------------------------------------------------------------------


@pytest.fixture
def budgeted(tmp_path: Path, matmul_onnx: Path, slow_onnx: Path) -> Iterator[RunningAgent]:
    yield from _agent(
        tmp_path,
        matmul_onnx,
        slow_onnx,
        max_body_bytes=4 * MiB,
        max_buffered_body_bytes=4 * MiB,
    )


def _big_infer(rows: int) -> bytes:
    body, length = oip_client.encode_infer_request({"x": np.ones((rows, 64), np.float32)}, None)
    assert length is not None
    return request(
        "POST",
        "/v2/models/m/infer",
        body,
        {"Inference-Header-Content-Length": str(length)},
    )


def test_a_body_holds_the_budget_it_sent_not_what_it_declared(budgeted: RunningAgent) -> None:
    """A client that declares a large body and sends nothing used to hold all of it in the
    shared budget (4 MiB here): two of them refused every large body for as long as they
    liked. A body now holds what arrived (1 MiB at first), so a real 2.5 MiB request goes
    through beside it; the budget still bounds what arrives: past it a body gets 503 with
    Retry-After, small requests still pass, and it comes back whole when they leave."""
    server = budgeted.agent.server
    request_big = _big_infer(10_240)  # 10240 x 64 FP32 = 2.5 MiB
    head, _, body = request_big.partition(b"\r\n\r\n")
    hog = Wire(budgeted.socket)
    hog.send(head + b"\r\n\r\n")
    wait_until(lambda: server.body_budget.used == MiB)
    with Wire(budgeted.socket) as good:
        good.send(request_big)
        answer = good.read()
    assert answer.status == 200
    assert answer.json()["outputs"][0]["shape"] == [10_240, 64]
    assert server.body_budget.used == MiB
    parker = Wire(budgeted.socket)
    parker.send(head + b"\r\n\r\n" + body[: 2 * MiB])
    wait_until(lambda: server.body_budget.used >= 3 * MiB)
    with Wire(budgeted.socket) as second:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            second.send(request_big)  # refused part way: the answer waits all the same
        refused = second.read()
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert "buffering" in refused.json()["error"]
    with Wire(budgeted.socket) as small:
        small.send(batch2())
        assert small.read().status == 200
    hog.sock.close()
    parker.sock.close()
    wait_until(lambda: server.body_budget.used == 0)
    with Wire(budgeted.socket) as retry:
        retry.send(request_big)
        assert retry.read().status == 200
    assert server.body_budget.used == 0


def test_the_client_reports_the_refusal_sent_before_the_close(budgeted: RunningAgent) -> None:
    """The agent refuses a body it cannot buffer (503) and stops reading it: the project's
    client, still sending, met a broken pipe and said so, not the agent's answer."""
    server = budgeted.agent.server
    head, _, body = _big_infer(15_000).partition(b"\r\n\r\n")  # 3.7 MiB
    parker = Wire(budgeted.socket)
    parker.send(head + b"\r\n\r\n" + body[: 3 * MiB])
    wait_until(lambda: server.body_budget.used >= 3 * MiB)
    try:
        with (
            InferenceClient(str(budgeted.socket)) as client,
            pytest.raises(UnavailableError, match=r"HTTP 503: .*buffering"),
        ):
            client.infer("m", {"x": np.ones((10_240, 64), np.float32)})
    finally:
        parker.sock.close()


def test_a_parked_body_is_freed_when_its_client_leaves_without_a_collection(
    budgeted: RunningAgent,
) -> None:
    """Connection and parser referred to each other: a parked body stayed resident until the
    next full collection. With the collector off, the connection must still be freed."""
    server = budgeted.agent.server
    head, _, body = _big_infer(12_288).partition(b"\r\n\r\n")
    gc.collect()
    gc.disable()
    try:
        parker = Wire(budgeted.socket)
        parker.send(head + b"\r\n\r\n" + body[: 2 * MiB])
        wait_until(lambda: server.body_budget.used >= 2 * MiB)
        (connection,) = list(server._connections)
        ref: weakref.ref[HttpConnection] = weakref.ref(connection)
        del connection
        parker.sock.close()
        wait_until(lambda: ref() is None)
    finally:
        gc.enable()


# -- descriptors and stopping ---------------------------------------------------------------


def test_no_descriptor_leak_after_an_attack(agent: RunningAgent) -> None:
    def fds() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    with Wire(agent.socket) as warm:  # the first connection creates lazily what later reuse
        warm.send(batch2())
        assert warm.read().status == 200
    before = fds()
    wires = _stall(agent.socket, 50) + _stall(agent.http, 50)
    for address in (agent.socket, agent.http):
        for _ in range(20):
            with Wire(address) as wire:
                wire.send(b"GARBAGE\r\n\r\n")
                assert wire.read().status == 400
    for wire in wires:
        wire.sock.close()
    wait_until(lambda: agent.agent.server.connection_count == 0)
    wait_until(lambda: fds() <= before)


def test_stopping_answers_a_connection_accepted_before_its_request(agent: RunningAgent) -> None:
    """A client that opens a connection per request (curl, edge-agent infer) and whose request
    arrives just after the stop began still gets its answer, with Connection: close; an idle
    keep-alive connection is closed."""
    server = agent.agent.server
    with Wire(agent.socket) as early, Wire(agent.socket) as idle:
        idle.send(request("GET", "/v2/health/live"))
        assert idle.read().status == 200
        wait_until(lambda: server.connection_count == 2)
        stopping = asyncio.run_coroutine_threadsafe(server.close(drain_timeout_s=10), agent.loop)
        wait_until(lambda: server.draining)
        assert idle.closed()
        early.send(batch2())
        answer = early.read()
        assert answer.status == 200
        assert answer.headers["connection"] == "close"
        stopping.result(timeout=20)
    with pytest.raises(OSError):
        Wire(agent.socket)


def test_a_stop_during_a_burst_resets_no_client(agent: RunningAgent, tmp_path: Path) -> None:
    """As under systemd's socket activation: a listening socket that another holder (here the
    test, playing systemd and the next agent) keeps open. Clients opening a connection per
    request hammer it while the agent stops: every one is answered, by the stopping agent or,
    from the backlog, by the next one; none is reset. (asyncio drops a connection it accepted
    but had not yet made a protocol for when its server closes: the exit then reset it.)"""
    path = tmp_path / "activated.sock"
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.bind(str(path))
    held.listen(socket.SOMAXCONN)
    server = agent.agent.server
    asyncio.run_coroutine_threadsafe(server.listen_socket(held.dup()), agent.loop).result(10)
    payload = request("GET", "/v2/health/live", headers={"Connection": "close"})
    outcomes: dict[str, int] = {}
    running = threading.Event()
    running.set()
    lock = threading.Lock()

    def client() -> None:
        while running.is_set():
            try:
                with Wire(path, timeout_s=20) as wire:
                    wire.send(payload)
                    outcome = f"HTTP {wire.read().status}"
            except OSError as exc:
                outcome = type(exc).__name__
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    succeeding = threading.Event()
    succeeding.set()

    def next_agent() -> None:
        held.settimeout(0.2)
        while succeeding.is_set():
            try:
                conn, _ = held.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    wait_until(lambda: sum(outcomes.values()) >= 200)
    asyncio.run_coroutine_threadsafe(server.close(), agent.loop).result(30)
    successor = threading.Thread(target=next_agent)
    successor.start()
    served_before = sum(outcomes.values())
    wait_until(lambda: sum(outcomes.values()) >= served_before + 100)
    running.clear()
    for thread in clients:  # their last requests are answered by the successor
        thread.join(30)
    succeeding.clear()
    successor.join(30)
    held.close()
    assert set(outcomes) == {"HTTP 200"}, outcomes


@pytest.mark.parametrize("listener", ["unix", "tcp"])
def test_expect_100_continue(agent: RunningAgent, listener: str) -> None:
    """curl asks before it sends a large body: the interim answer comes at once (curl would
    otherwise wait a second), and never ahead of an earlier request's answer; a body over the
    limit is refused instead, before it is sent."""
    body, _ = oip_client.encode_infer_request(
        {"x": np.ones((2, 64), np.float32)}, None, binary=False
    )
    head = (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    address = agent.socket if listener == "unix" else agent.http
    with Wire(address) as wire:
        wire.send(head)
        interim = wire.sock.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        wire.send(body)
        answer = wire.read()
        assert answer.status == 200
        # Behind a request still running, no interim answer may overtake its answer.
        wire.send(slow_request() + head + body)
        first = wire.read()
        assert first.json()["model_name"] == "slow"
        # A 100 sent ahead of the slow request's answer would have failed the read above.
        assert wire.read().status == 200
    huge = (
        b"POST /v2/models/m/infer HTTP/1.1\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (10 * 1024**3)
    )
    with Wire(address) as other:
        other.send(huge)
        refused = other.read()
        assert refused.status == 413


def test_server_error_messages_are_json_everywhere(agent: RunningAgent) -> None:
    with Wire(agent.socket) as wire:
        wire.send(request("DELETE", "/v2/models/m/infer", b"{}"))
        answer = wire.read()
    assert answer.status == 405
    assert json.loads(answer.body) == {"error": "inference must be sent with POST"}


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v2/health/ready HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ],
)
def test_an_upgrade_gets_one_answer(agent: RunningAgent, head: bytes) -> None:
    """It got the request's answer, then a 400: two answers to one request."""
    with Wire(agent.socket) as wire:
        wire.send(head)
        answer = wire.read()
        assert answer.status == 400
        assert "protocol upgrades are not supported" in answer.json()["error"]
        assert wire.closed()


def test_an_absolute_form_target_is_its_path(agent: RunningAgent) -> None:
    """RFC 9112: a server must take 'GET http://host/path' as the path (it answered 404)."""
    with Wire(agent.socket) as wire:
        wire.send(b"GET http://localhost:8000/v2/health/ready?x=1 HTTP/1.1\r\n\r\n")
        assert wire.read().status == 200
        wire.send(b"GET http://localhost HTTP/1.1\r\n\r\n")
        assert wire.read().status == 404  # the root: no route, as "/" is


def test_unix_socket_peer_is_known(agent: RunningAgent) -> None:
    with Wire(agent.socket) as wire:
        wire.send(request("GET", "/v2/health/live"))
        assert wire.read().status == 200
        (connection,) = [c for c in list(agent.agent.server._connections) if c.listener == "unix"]
        assert connection.peer == os.getuid()
