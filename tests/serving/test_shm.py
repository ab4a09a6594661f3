"""Triton's system shared-memory extension against a real agent: tritonclient over TCP, the
project's client over the Unix socket, and what a peer may not do (another peer's regions,
objects it does not own, out-of-bounds placements, past its caps); regions go with the
connection that registered them."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import tritonclient.utils.shared_memory as tshm
from tritonclient.utils import InferenceServerException

from agent.daemon import LocalModel
from agent.errors import RequestError, UnavailableError
from agent.serving.client import InferenceClient
from agent.serving.shm.client import SharedRegion
from agent.serving.shm.registry import ShmLimits, ShmRegistry
from tests.serving.conftest import RunningAgent, start_agent

X_BYTES = 64 * 4  # matmul's x: 1 x 64 FP32
INFER = "/v2/models/matmul/infer"


@pytest.fixture
def shm_agent(tmp_path: Path, matmul_onnx: Path) -> Iterator[RunningAgent]:
    yield from start_agent(
        [LocalModel("matmul", matmul_onnx)],
        tmp_path / "infer.sock",
        shm_max_regions_per_peer=3,
        shm_max_bytes_per_peer=1024 * 1024,
    )


@pytest.fixture
def key() -> Iterator[str]:
    """A fresh shm key; the object is removed afterwards whoever created it."""
    name = f"edge-agent-test-{uuid.uuid4().hex[:12]}"
    yield "/" + name
    Path("/dev/shm", name).unlink(missing_ok=True)


def expected(matmul_onnx: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    result: np.ndarray[Any, Any] = session.run(None, {"x": x})[0]
    return result


def raw(sock: socket.socket, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    """One request on a raw connection (the peer stays this socket)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    length = int(head_bytes.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head_bytes.split()[1]), json.loads(rest) if rest else None


def register_body(key: str, byte_size: int, offset: int = 0) -> bytes:
    return json.dumps({"key": key, "offset": offset, "byte_size": byte_size}).encode()


def infer_body(region: str, offset: int = 0, size: int = X_BYTES) -> bytes:
    params = {"shared_memory_region": region, "shared_memory_byte_size": size}
    if offset:
        params["shared_memory_offset"] = offset
    entry = {"name": "x", "datatype": "FP32", "shape": [1, 64], "parameters": params}
    return json.dumps({"inputs": [entry]}).encode()


def test_tritonclient_over_tcp(shm_agent: RunningAgent, matmul_onnx: Path, key: str) -> None:
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    url = shm_agent.http.removeprefix("http://")
    client = triton.InferenceServerClient(url)
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]
    region = tshm.create_shared_memory_region("io", key, 2 * X_BYTES)
    try:
        tshm.set_shared_memory_region(region, [x])
        client.register_system_shared_memory("io", key, 2 * X_BYTES)
        status = client.get_system_shared_memory_status()
        assert status == [{"name": "io", "key": key, "offset": 0, "byte_size": 2 * X_BYTES}]
        assert client.get_system_shared_memory_status("io") == status
        with pytest.raises(InferenceServerException, match="no shared-memory region 'nope'"):
            client.get_system_shared_memory_status("nope")
        given = triton.InferInput("x", [1, 64], "FP32")
        given.set_shared_memory("io", X_BYTES)
        wanted = triton.InferRequestedOutput("y")
        wanted.set_shared_memory("io", X_BYTES, offset=X_BYTES)
        result = client.infer("matmul", [given], outputs=[wanted])
        entry = result.get_output("y")
        assert entry["parameters"]["shared_memory_region"] == "io"
        assert entry["parameters"]["shared_memory_byte_size"] == X_BYTES
        y = tshm.get_contents_as_numpy(region, np.float32, [1, 64], offset=X_BYTES)
        np.testing.assert_allclose(y, expected(matmul_onnx, x), rtol=1e-5, atol=1e-5)
        client.unregister_system_shared_memory("io")
        assert client.get_system_shared_memory_status() == []
        with pytest.raises(InferenceServerException, match="no shared-memory region 'io'"):
            client.infer("matmul", [given], outputs=[wanted])
    finally:
        client.close()
        tshm.destroy_shared_memory_region(region)


def test_project_client_over_unix_socket(shm_agent: RunningAgent, matmul_onnx: Path) -> None:
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    with InferenceClient(str(shm_agent.socket)) as client:
        region = client.create_region("frames", 4096)
        try:
            # The agent's user reads it through the socket's group.
            info = Path("/dev/shm", region.key.lstrip("/")).stat()
            assert (info.st_mode & 0o777, info.st_gid) == (0o660, shm_agent.socket.stat().st_gid)
            placed_x = region.put(x, offset=128)
            placed_y = region.place(1024, "FP32", (1, 64))
            outputs = client.infer("matmul", {"x": placed_x}, output_regions={"y": placed_y})
            np.testing.assert_allclose(outputs["y"], expected(matmul_onnx, x), rtol=1e-5, atol=1e-5)
            # The answer is a view of our region: the agent wrote it there.
            assert np.shares_memory(outputs["y"], region.array(placed_y))
            assert client.region_status()[0]["name"] == "frames"
            # A new connection (the agent dropped the region with the old one): registered
            # again before the next call.
            client.close()
            again = client.infer("matmul", {"x": placed_x}, output_regions={"y": placed_y})
            np.testing.assert_array_equal(again["y"], outputs["y"])
            for _ in range(20):  # the inputs' copies are given back once each request is done
                client.infer("matmul", {"x": placed_x}, output_regions={"y": placed_y})
            copies = shm_agent.agent.server.shm.copies
            deadline = time.monotonic() + 5  # the agent may count the last one after it answers
            while copies.used and time.monotonic() < deadline:
                time.sleep(0.01)
            assert copies.used == 0
            client.unregister_region("frames")
            assert client.region_status() == []
        finally:
            region.close()
    assert not Path("/dev/shm", region.key.lstrip("/")).exists()
    deadline = time.monotonic() + 5
    while shm_agent.agent.server.shm.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shm_agent.agent.server.shm.held == 0


def make_object(key: str, size: int, mode: int = 0o600) -> Path:
    path = Path("/dev/shm", key.lstrip("/"))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
    os.ftruncate(fd, size)
    os.close(fd)
    return path


def unix(agent: RunningAgent) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(agent.socket))
    return sock


def tcp(agent: RunningAgent) -> socket.socket:
    host, _, port = agent.http.removeprefix("http://").rpartition(":")
    return socket.create_connection((host, int(port)))


def test_bounds_are_checked_at_registration_and_at_every_use(
    shm_agent: RunningAgent, key: str
) -> None:
    path = make_object(key, 4096)
    with unix(shm_agent) as sock:
        status, body = raw(
            sock,
            "POST",
            "/v2/systemsharedmemory/region/r/register",
            register_body(key, 4096, offset=1),
        )
        assert status == 400
        assert (
            "offset 1 + shared_memory_byte_size 4096 = 4097 bytes is past the end" in body["error"]
        )
        assert (
            raw(sock, "POST", "/v2/systemsharedmemory/region/r/register", register_body(key, 4096))[
                0
            ]
            == 200
        )
        status, body = raw(sock, "POST", "/v2/models/matmul/infer", infer_body("r", offset=3900))
        assert status == 400
        assert body["error"] == (
            "input 'x': shared_memory_offset 3900 + shared_memory_byte_size 256 = 4156 bytes "
            "is past the end of region 'r' (4096 bytes)"
        )
        status, body = raw(sock, "POST", "/v2/models/matmul/infer", infer_body("r", size=100))
        assert status == 400
        assert (
            "shared_memory_byte_size is 100 bytes, shape [1, 64] of FP32 needs 256"
            in (body["error"])
        )
        # An output larger than its placement is refused, and nothing is written.
        entry = json.loads(infer_body("r"))
        entry["outputs"] = [
            {
                "name": "y",
                "parameters": {
                    "shared_memory_region": "r",
                    "shared_memory_offset": 1024,
                    "shared_memory_byte_size": 128,
                },
            }
        ]
        status, body = raw(sock, "POST", "/v2/models/matmul/infer", json.dumps(entry).encode())
        assert status == 400
        assert "the output has 256 bytes" in body["error"]
        assert "shared_memory_byte_size is 128" in body["error"]
        # The object cut short after registration: refused, not a SIGBUS.
        os.truncate(path, 100)
        status, body = raw(sock, "POST", "/v2/models/matmul/infer", infer_body("r"))
        assert status == 400
        assert "its object" in body["error"]
        assert "now has only 100 bytes" in body["error"]
        assert raw(sock, "GET", "/v2/health/live")[0] == 200


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("/a/b", "without another '/'"),
        ("/" + "k" * 256, "1 to 255 printable characters"),
        ("/..", "without another '/'"),
        ("/edge-agent-test-missing", "no such object in /dev/shm"),
    ],
)
def test_bad_keys_are_refused(shm_agent: RunningAgent, key: str, message: str) -> None:
    with unix(shm_agent) as sock:
        status, body = raw(
            sock, "POST", "/v2/systemsharedmemory/region/r/register", register_body(key, 64)
        )
    assert status == 400
    assert message in body["error"]


def test_symlinked_key_is_not_followed(shm_agent: RunningAgent, key: str, tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 4096)
    link = Path("/dev/shm", key.lstrip("/"))
    link.symlink_to(target)
    with unix(shm_agent) as sock:
        status, body = raw(
            sock, "POST", "/v2/systemsharedmemory/region/r/register", register_body(key, 64)
        )
    assert status == 400
    assert "cannot open it" in body["error"]


def test_another_peer_cannot_use_a_region(shm_agent: RunningAgent, key: str) -> None:
    make_object(key, 4096)
    with unix(shm_agent) as mine, tcp(shm_agent) as first, tcp(shm_agent) as second:
        assert (
            raw(mine, "POST", "/v2/systemsharedmemory/region/r/register", register_body(key, 4096))[
                0
            ]
            == 200
        )
        # Another process on the Unix socket.
        script = (
            "import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            f"b={infer_body('r')!r};"
            "s.sendall(b'POST /v2/models/matmul/infer HTTP/1.1\\r\\nContent-Length: %d\\r\\n\\r\\n'"
            " % len(b) + b);print(s.recv(65536).decode())"
        )
        other = subprocess.run(
            [sys.executable, "-c", script, str(shm_agent.socket)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert " 400 " in other.stdout.splitlines()[0]
        assert "no shared-memory region 'r' is registered by this client" in other.stdout
        # On TCP the peer is the connection: a second connection of the same process.
        assert (
            raw(
                first, "POST", "/v2/systemsharedmemory/region/t/register", register_body(key, 4096)
            )[0]
            == 200
        )
        status, body = raw(second, "POST", "/v2/models/matmul/infer", infer_body("t"))
        assert status == 400
        assert "no shared-memory region 't' is registered by this client" in body["error"]
        assert raw(second, "GET", "/v2/systemsharedmemory/status") == (200, [])
        assert raw(first, "POST", "/v2/models/matmul/infer", infer_body("t"))[0] == 200
        assert raw(mine, "POST", "/v2/models/matmul/infer", infer_body("r"))[0] == 200


def test_an_object_of_another_user_is_refused(shm_agent: RunningAgent, key: str) -> None:
    """A client as 'nobody' (over TCP: its uid read from /proc/net/tcp) may not register an
    object root owns, even one the agent can read; its own object it may."""
    make_object(key, 4096, 0o644)
    account = pwd.getpwnam("nobody")  # looked up before the fork: the child calls no NSS
    nobody, nogroup = account.pw_uid, account.pw_gid
    own = key + "-nobody"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as nobody, over TCP, then out without running any cleanup
        status = 1
        try:
            os.close(read_end)
            os.setgid(nogroup)
            os.setuid(nobody)
            with tcp(shm_agent) as sock:
                answers = [
                    raw(
                        sock,
                        "POST",
                        "/v2/systemsharedmemory/region/r/register",
                        register_body(key, 4096),
                    )
                ]
                make_object(own, 4096)
                answers.append(
                    raw(
                        sock,
                        "POST",
                        "/v2/systemsharedmemory/region/mine/register",
                        register_body(own, 4096),
                    )
                )
            os.write(write_end, json.dumps(answers).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            output = pipe.read()
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        Path("/dev/shm", own.lstrip("/")).unlink(missing_ok=True)
    (refused_status, refused), (accepted_status, _) = json.loads(output)
    assert refused_status == 403
    assert f"belongs to uid 0, not to the peer registering it (uid {nobody})" in refused["error"]
    assert accepted_status == 200


def test_regions_go_with_the_connection(shm_agent: RunningAgent, key: str) -> None:
    make_object(key, 4096)
    registry = shm_agent.agent.server.shm
    for connect in (unix, tcp):
        with connect(shm_agent) as sock:
            assert (
                raw(
                    sock,
                    "POST",
                    "/v2/systemsharedmemory/region/r/register",
                    register_body(key, 4096),
                )[0]
                == 200
            )
            assert registry.held == 1
        for _ in range(200):
            if registry.held == 0:
                break
            time.sleep(0.01)
        assert registry.held == 0


def test_the_registry_is_made_when_a_request_first_names_a_region(
    shm_agent: RunningAgent, key: str
) -> None:
    """Requests that name no region leave the extension unloaded (tests/test_footprint.py
    checks the idle daemon imports none of agent.serving.shm); the first that names one makes
    the registry and is answered as before; regions still go with the connection."""
    server = shm_agent.agent.server
    data = {"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}
    with unix(shm_agent) as sock:
        status, answer = raw(sock, "POST", INFER, json.dumps({"inputs": [data]}).encode())
        assert status == 200 and answer["outputs"][0]["name"] == "y"
        assert server._shm is None
        status, answer = raw(sock, "POST", INFER, infer_body("nope"))
        assert status == 400 and "no shared-memory region 'nope'" in answer["error"]
        assert server._shm is not None
    make_object(key, 4096)
    with unix(shm_agent) as sock:  # a connection's view is made at its first extension call
        path = "/v2/systemsharedmemory/region/r/register"
        assert raw(sock, "POST", path, register_body(key, 4096))[0] == 200
        assert server.shm.held == 1
    for _ in range(200):
        if server.shm.held == 0:
            break
        time.sleep(0.01)
    assert server.shm.held == 0


def test_caps_per_peer(shm_agent: RunningAgent, key: str) -> None:
    make_object(key, 2 * 1024 * 1024)
    with unix(shm_agent) as sock:
        status, body = raw(
            sock,
            "POST",
            "/v2/systemsharedmemory/region/big/register",
            register_body(key, 2 * 1024 * 1024),
        )
        assert status == 413
        assert "exceed the limit (serving.shm_max_bytes_per_peer) of 1048576" in body["error"]
        for name in ("a", "b", "c"):
            assert (
                raw(
                    sock,
                    "POST",
                    f"/v2/systemsharedmemory/region/{name}/register",
                    register_body(key, 4096),
                )[0]
                == 200
            )
        status, body = raw(
            sock, "POST", "/v2/systemsharedmemory/region/d/register", register_body(key, 4096)
        )
        assert status == 413
        assert (
            "already has 3 regions, the limit (serving.shm_max_regions_per_peer) is 3"
            in (body["error"])
        )
        status, body = raw(
            sock, "POST", "/v2/systemsharedmemory/region/a/register", register_body(key, 4096)
        )
        assert status == 400
        assert "already registered by this client" in body["error"]
        assert raw(sock, "POST", "/v2/systemsharedmemory/unregister")[0] == 200
        assert raw(sock, "GET", "/v2/systemsharedmemory/status") == (200, [])


def test_project_client_errors(shm_agent: RunningAgent, key: str) -> None:
    region = SharedRegion("small", key, 128)
    try:
        with InferenceClient(str(shm_agent.socket)) as client:
            client.register_region(region)
            with pytest.raises(RequestError, match="past the end of region"):
                region.place(0, "FP32", (1, 64))
    finally:
        region.close()


def test_regions_of_all_peers_are_capped(key: str) -> None:
    make_object(key, 4096)
    registry = ShmRegistry(ShmLimits(max_regions_total=2))
    peers = [registry.peer(("tcp", n), n, os.getuid) for n in range(3)]
    for peer in peers[:2]:
        peer.register("r", {"key": key, "offset": 0, "byte_size": 4096})
    with pytest.raises(UnavailableError, match="holds 2 regions of all its clients"):
        peers[2].register("r", {"key": key, "offset": 0, "byte_size": 4096})
    peers[0].close()
    peers[2].register("r", {"key": key, "offset": 0, "byte_size": 4096})
    for peer in peers:
        peer.close()
    assert registry.held == 0


def test_an_input_past_the_copy_budget_is_refused(
    tmp_path: Path, matmul_onnx: Path, key: str
) -> None:
    """Inputs are copied out of regions (never mapped: tests/serving/test_shm_region.py); the
    copies of all clients share ``max_buffered_body_bytes``, here smaller than one input."""
    make_object(key, 4096)
    for agent in start_agent(
        [LocalModel("matmul", matmul_onnx)],
        tmp_path / "infer.sock",
        max_body_bytes=240,
        max_buffered_body_bytes=240,
    ):
        with unix(agent) as sock:
            path = "/v2/systemsharedmemory/region/r/register"
            assert raw(sock, "POST", path, register_body(key, 4096))[0] == 200
            status, body = raw(sock, "POST", INFER, infer_body("r"))
            assert status == 413
            assert body["error"] == (
                "input 'x': 256 bytes in shared memory exceed what the agent copies for all "
                "requests together (serving.max_buffered_body_bytes, 240)"
            )
            assert agent.agent.server.shm.copies.used == 0
            assert raw(sock, "GET", "/v2/health/live")[0] == 200
