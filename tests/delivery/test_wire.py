"""The fetcher against real TLS servers: certificate failures, client certificates, HTTP
errors, slow and broken transfers, resume, outages and backoff, partial downloads, nginx, and a
full disk."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadError

from agent.config import AgentSection, Config, RepositorySection
from agent.delivery.cycle import run_cycle
from agent.delivery.fetcher import FetchConfig, HttpxFetcher
from agent.models.store import ModelStore
from agent.state import StateDB
from cloud_stub.certs import Pki, make_pki
from cloud_stub.cli import main as edge_cloud
from cloud_stub.https import RepositoryServer
from cloud_stub.ports import free_port
from tests.disks import small_tmpfs

from .conftest import World, partials


def test_update_over_https(https_world: tuple[World, RepositoryServer]) -> None:
    world, _ = https_world
    report = world.updater().check_once()
    assert report.installed == [("mm", 1)], report.error


@pytest.mark.parametrize("problem", ["wrong-ca", "expired", "wrong-host"])
def test_tls_failures_are_refused(
    https_world: tuple[World, RepositoryServer], tmp_path: Path, pki: Pki, problem: str
) -> None:
    world, server = https_world
    server.stop()
    other = make_pki(tmp_path / "other")
    if problem == "wrong-ca":
        cert, key = other.server_cert, other.server_key
    elif problem == "expired":
        expired = make_pki(tmp_path / "expired", server_expired=True)
        cert, key = expired.server_cert, expired.server_key
        world.fetcher = HttpxFetcher(FetchConfig(ca_file=expired.ca_cert, retries=0))
    else:
        wrong = make_pki(tmp_path / "wrong", hosts=("wrong.example",))
        cert, key = wrong.server_cert, wrong.server_key
        world.fetcher = HttpxFetcher(FetchConfig(ca_file=wrong.ca_cert, retries=0))
    with RepositoryServer(world.repo.public, cert, key, port=server.port):
        report = world.updater().check_once()
    assert report.installed == []
    assert "TLS verification failed" in report.error
    expected = {
        "wrong-ca": "certificate verify failed",
        "expired": "expired",
        "wrong-host": "mismatch",
    }[problem]
    assert expected in report.error.lower() or expected in report.error
    assert world.store.versions("mm") == []


def test_http_404_for_a_wrong_base(https_world: tuple[World, RepositoryServer]) -> None:
    world, server = https_world
    world.base = server.url + "/nowhere"
    report = world.updater().check_once()
    assert "404" in report.error
    assert world.store.versions("mm") == []


def test_repository_down_then_back(https_world: tuple[World, RepositoryServer], pki: Pki) -> None:
    world, server = https_world
    server.stop()
    report = world.updater().check_once()
    assert "repository unreachable" in report.error
    with RepositoryServer(world.repo.public, pki.server_cert, pki.server_key, port=server.port):
        assert world.updater().check_once().installed == [("mm", 1)]


def test_refused_connection_is_retried_with_jittered_backoff(
    https_world: tuple[World, RepositoryServer], pki: Pki
) -> None:
    world, server = https_world
    server.stop()  # nothing listens on the port any more: every connection is refused
    delays: list[float] = []
    fetcher = HttpxFetcher(
        FetchConfig(ca_file=pki.ca_cert, retries=4, backoff_base_s=0.1, backoff_max_s=10),
        sleep=delays.append,
    )
    url = f"{server.url}/targets/models/mm/1/model.onnx"
    ceilings = [0.1 * 2**attempt for attempt in range(4)]
    # A fresh download (through python-tuf's fetch) and a resumed one (fetch_from, which no
    # python-tuf wrapper protects) fail the same way.
    fetches: list[Callable[[], Iterator[bytes]]] = [
        lambda: fetcher.fetch(url),
        lambda: fetcher.fetch_from(url, 100),
    ]
    try:
        for fetch in fetches:
            delays.clear()
            with pytest.raises(DownloadError) as caught:
                list(fetch())
            message = str(caught.value)
            assert message.startswith(f"{url}: connection refused"), message
            assert message.endswith("gave up after 5 attempts"), message
            assert len(delays) == 4, delays
            # Exponential: each wait longer than the one before, within [ceiling/2, ceiling].
            assert all(a < b for a, b in itertools.pairwise(delays)), delays
            assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
            assert delays != ceilings, "no jitter: the waits are the deterministic sequence"
        assert fetcher.requests == 10
        # Through the updater the same failure is a report, not an exception.
        world.fetcher = fetcher
        report = world.updater().check_once()
        assert report.error.startswith(
            f"repository unreachable: {server.url}/metadata/1.root.json: connection refused"
        ) or report.error.startswith(
            f"repository unreachable: {server.url}/metadata/2.root.json: connection refused"
        ), report.error
    finally:
        fetcher.close()


def test_accept_encoding_identity_is_sent(https_world: tuple[World, RepositoryServer]) -> None:
    world, server = https_world
    assert world.updater().check_once().installed == [("mm", 1)]
    seen = server.requests
    assert any("/targets/" in r.path for r in seen), seen
    assert any("/metadata/" in r.path for r in seen), seen
    for request in seen:
        assert request.headers.get("accept-encoding") == "identity", (request, request.headers)


def _edge_cloud_serve(repo: Path, pki_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """``edge-cloud serve`` in a subprocess, once it listens (its output in ``serve.log``)."""
    log = pki_dir.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud_stub.cli",
                "serve",
                str(repo),
                "--https",
                f"127.0.0.1:{port}",
                "--cert",
                str(pki_dir / "server.pem"),
                "--key",
                str(pki_dir / "server.key"),
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return process
        if process.poll() is not None:
            pytest.fail(f"edge-cloud serve exited: {log.read_text()}")
        threading.Event().wait(0.1)
    process.kill()
    process.wait(10)
    pytest.fail(f"edge-cloud serve did not listen: {log.read_text()}")


@pytest.mark.parametrize("with_cert", [True, False])
def test_client_certificate_required(
    https_world: tuple[World, RepositoryServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    with_cert: bool,
) -> None:
    world, _ = https_world
    pki_dir = tmp_path / "fleet-pki"
    assert edge_cloud(["certs", str(pki_dir), "--device", "device-1"]) == 0
    capsys.readouterr()
    port = free_port()
    process = _edge_cloud_serve(
        world.repo.root, pki_dir, port, "--client-ca", str(pki_dir / "ca.pem")
    )
    client = (
        {"client_cert": pki_dir / "device-1.pem", "client_key": pki_dir / "device-1.key"}
        if with_cert
        else {}
    )
    world.fetcher = HttpxFetcher(
        FetchConfig(ca_file=pki_dir / "ca.pem", retries=2, backoff_base_s=0.01, **client)  # type: ignore[arg-type]
    )
    world.base = f"https://127.0.0.1:{port}"
    try:
        report = world.updater().check_once()
    finally:
        process.terminate()
        process.wait(10)
    if with_cert:
        assert report.installed == [("mm", 1)], report.error
        return
    assert report.installed == []
    assert "the server refused the TLS handshake: it requires a client certificate" in (
        report.error
    ), report.error
    assert "Failed to download" not in report.error
    assert world.fetcher.requests == 1, "a refused handshake is not retried"  # type: ignore[attr-defined]


class FaultServer:
    """A TLS server that serves files from a directory with one injected fault:
    ``drip`` (one byte a second), ``drop`` (close mid-body on the first request of each model
    file, then honour Range), ``drop-down`` (close mid-body on the first model file and stop
    listening: the host is down) or ``error500`` (the first request of each file fails)."""

    def __init__(self, root: Path, pki: Pki, fault: str, port: int = 0) -> None:
        self.root = root
        self.fault = fault
        self.requests: list[tuple[str, str | None]] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop_event = threading.Event()
        self.seen: set[str] = set()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop_event.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listening socket was closed: the host is down
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def go_down(self) -> None:
        """Stop listening: from now on connections are refused."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _handle(self, raw: socket.socket) -> None:
        with (
            contextlib.suppress(OSError, ssl.SSLError),
            self.context.wrap_socket(raw, server_side=True) as conn,
        ):
            while not self.stop_event.is_set():
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {
                    k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)
                }
                rng = headers.get("range")
                self.requests.append((path, rng))
                file = self.root / path.lstrip("/")
                if not file.is_file():
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    continue
                data = file.read_bytes()
                is_target = "/targets/" in path
                first = path not in self.seen
                self.seen.add(path)
                if self.fault == "error500" and first:
                    conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                    continue
                start = 0
                status = b"200 OK"
                extra = b""
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    status = b"206 Partial Content"
                    extra = b"Content-Range: bytes %d-%d/%d\r\n" % (start, len(data) - 1, len(data))
                body = data[start:]
                conn.sendall(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Length: %d\r\n" % len(body)
                    + extra
                    + b"\r\n"
                )
                if self.fault == "drip" and is_target:
                    for i in range(len(body)):
                        if self.stop_event.wait(1.0):
                            return
                        conn.sendall(body[i : i + 1])
                    continue
                if self.fault == "drop" and is_target and first:
                    conn.sendall(body[: len(body) // 2])
                    return  # connection closed mid-body
                if self.fault == "drop-down" and is_target:
                    conn.sendall(body[: len(body) // 2])
                    self.go_down()
                    return  # connection closed mid-body, and nobody listens any more
                conn.sendall(body)

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def fault_world(
    tmp_path: Path, pki: Pki, request: pytest.FixtureRequest
) -> Iterator[tuple[World, FaultServer]]:
    from cloud_stub.repo import Repository

    from .conftest import AttackerFetcher

    repo = Repository.init(tmp_path / "repo")
    world = World(
        tmp_path, repo, ModelStore(tmp_path / "device" / "models"), AttackerFetcher(repo.public)
    )
    world.publish(1)
    server = FaultServer(repo.public, pki, request.param)
    world.base = f"https://127.0.0.1:{server.port}"
    world.fetcher = HttpxFetcher(
        FetchConfig(
            ca_file=pki.ca_cert, file_deadline_s=2, read_timeout_s=5, retries=2, backoff_base_s=0.01
        )
    )
    try:
        yield world, server
    finally:
        world.fetcher.close()  # type: ignore[attr-defined]
        server.close()


@pytest.mark.parametrize("fault_world", ["drip"], indirect=True)
def test_slow_retrieval_hits_the_deadline(fault_world: tuple[World, FaultServer]) -> None:
    world, _ = fault_world
    report = world.updater().check_once()
    assert report.installed == []
    assert "slow retrieval" in report.error
    assert world.staging_empty()
    assert partials(world) == [], "what a dripping server sent is not kept"


@pytest.mark.parametrize("fault_world", ["drop"], indirect=True)
def test_dropped_connection_resumes_with_range(fault_world: tuple[World, FaultServer]) -> None:
    world, server = fault_world
    report = world.updater().check_once()
    assert report.installed == [("mm", 1)], report.error
    ranges = [r for path, r in server.requests if "/targets/" in path and r]
    assert ranges, "the fetcher did not resume with a Range request"
    assert ranges[0].startswith("bytes=")


def _model_file(world: World, version: int = 1) -> tuple[str, bytes]:
    info = next(t for _, t in world.repo.targets() if t.path == f"models/mm/{version}/model.onnx")
    sha = info.hashes["sha256"]
    return sha, (world.repo.targets_dir / f"models/mm/{version}" / f"{sha}.model.onnx").read_bytes()


@pytest.mark.parametrize("fault_world", ["drop-down"], indirect=True)
def test_connection_dropped_mid_file_then_host_down(
    fault_world: tuple[World, FaultServer], pki: Pki
) -> None:
    world, server = fault_world
    sha, data = _model_file(world)
    report = world.updater().check_once()  # must report, not raise
    assert report.installed == []
    assert report.error.startswith("mm version 1: download of models/mm/1/model.onnx failed: "), (
        report.error
    )
    assert "connection refused" in report.error, report.error
    failed = [e for e in report.events if e.kind == "failed"]
    assert [(e.name, e.version) for e in failed] == [("mm", 1)]
    assert world.store.versions("mm") == []
    assert world.staging_empty()
    # The half that arrived is kept: resuming it can succeed once the host is back.
    partial = world.store.root / ".partial" / sha
    assert partials(world) == [sha]
    assert partial.read_bytes() == data[: len(data) // 2]
    back = FaultServer(world.repo.public, pki, "none", port=server.port)
    try:
        report = world.updater().check_once()
    finally:
        back.close()
    assert report.installed == [("mm", 1)], report.error
    ranges = [r for path, r in back.requests if "/targets/" in path and r]
    assert ranges == [f"bytes={len(data) // 2}-"]
    assert partials(world) == []


@pytest.mark.parametrize("fault_world", ["none"], indirect=True)
def test_stale_partials_are_cleared_at_the_start_of_a_cycle(
    fault_world: tuple[World, FaultServer],
) -> None:
    world, server = fault_world
    old_sha, old_data = _model_file(world, 1)
    world.publish(2)
    sha, data = _model_file(world, 2)
    directory = world.store.root / ".partial"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / old_sha).write_bytes(old_data[:100])  # of version 1, superseded by 2
    (directory / hashlib.sha256(b"gone").hexdigest()).write_bytes(b"x" * 100)  # unpublished
    (directory / sha).write_bytes(data[:100])  # the one this cycle fetches: resumed
    report = world.updater().check_once()
    assert report.installed == [("mm", 2)], report.error
    ranges = [r for path, r in server.requests if "/targets/" in path and r]
    assert ranges == ["bytes=100-"]
    assert partials(world) == []


@pytest.mark.parametrize("fault_world", ["none"], indirect=True)
def test_partials_are_kept_while_the_repository_is_unreachable(
    fault_world: tuple[World, FaultServer],
) -> None:
    world, server = fault_world
    sha, data = _model_file(world)
    partial = world.store.root / ".partial" / sha
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data[:100])
    server.go_down()
    report = world.updater().check_once()
    assert "repository unreachable" in report.error
    assert partials(world) == [sha], "what the cycle could not check is not thrown away"


@pytest.mark.parametrize("fault_world", ["none"], indirect=True)
def test_partial_is_deleted_when_the_target_is_gone(
    fault_world: tuple[World, FaultServer],
) -> None:
    world, _ = fault_world
    sha, data = _model_file(world)
    partial = world.store.root / ".partial" / sha
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data[:100])
    # The mirror lost the file (HTTP 404 on the resume): those bytes cannot be completed.
    (world.repo.targets_dir / "models/mm/1" / f"{sha}.model.onnx").unlink()
    report = world.updater().check_once()
    assert "HTTP 404" in report.error, report.error
    assert partials(world) == []


@pytest.mark.parametrize("fault_world", ["none"], indirect=True)
def test_partial_download_resumes_after_a_restart(fault_world: tuple[World, FaultServer]) -> None:
    world, server = fault_world
    info = next(t for _, t in world.repo.targets() if t.path.endswith("model.onnx"))
    sha = info.hashes["sha256"]
    data = (world.repo.targets_dir / "models/mm/1" / f"{sha}.model.onnx").read_bytes()
    partial = world.store.root / ".partial" / sha
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data[: len(data) // 2])  # what a killed agent left behind
    report = world.updater().check_once()
    assert report.installed == [("mm", 1)], report.error
    ranges = [r for path, r in server.requests if "/targets/" in path and r]
    assert ranges == [f"bytes={len(data) // 2}-"]
    assert not partial.exists()


@pytest.mark.parametrize("fault_world", ["none"], indirect=True)
def test_corrupt_partial_is_discarded(fault_world: tuple[World, FaultServer]) -> None:
    world, _ = fault_world
    info = next(t for _, t in world.repo.targets() if t.path.endswith("model.onnx"))
    partial = world.store.root / ".partial" / info.hashes["sha256"]
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\0" * 100)  # not the start of the signed file
    report = world.updater().check_once()
    assert "do not match the signed length and hash" in report.error
    assert not partial.exists()
    assert world.updater().check_once().installed == [("mm", 1)]


@pytest.mark.parametrize("fault_world", ["error500"], indirect=True)
def test_server_errors_are_retried(fault_world: tuple[World, FaultServer]) -> None:
    world, server = fault_world
    report = world.updater().check_once()
    assert report.installed == [("mm", 1)], report.error
    assert len(server.requests) > len({p for p, _ in server.requests})


def test_disk_full_during_download(
    https_world: tuple[World, RepositoryServer], tmp_path: Path
) -> None:
    world, _ = https_world
    with small_tmpfs(tmp_path / "small", "16k") as mount:
        world.publish(2, name="mm")  # model bytes + the store's metadata exceed 16 KiB
        big = world.root / "big.onnx"
        from cloud_stub.samples import matmul_model

        matmul_model(big, k=64, n=64)
        from cloud_stub.publish import publish

        publish(world.repo, big, "mm", 3, log=lambda *_: None)
        world.store = ModelStore(mount / "models")
        report = world.updater().check_once()
        assert report.installed == []
        assert "No space left on device (disk full)" in report.error
        assert world.store.versions("mm") == []
        assert not any(world.store.staging.iterdir())
        assert partials(world) == [], "the partial download must not hold the full disk"


def test_nginx_serves_the_repository(
    https_world: tuple[World, RepositoryServer], pki: Pki, tmp_path: Path
) -> None:
    world, _ = https_world
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed; `make test` installs it")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
user root root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp_path}/body;
  proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/fastcgi;
  uwsgi_temp_path {tmp_path}/uwsgi;
  scgi_temp_path {tmp_path}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {pki.server_cert};
    ssl_certificate_key {pki.server_key};
    root {world.repo.public};
    autoindex off;
  }}
}}
"""
    )
    process = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = 50
        for _ in range(deadline):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None:
                pytest.fail(f"nginx exited: {(tmp_path / 'nginx-error.log').read_text()}")
            threading.Event().wait(0.1)
        world.base = f"https://127.0.0.1:{port}"
        report = world.updater().check_once()
        assert report.installed == [("mm", 1)], report.error
    finally:
        process.terminate()
        process.wait(10)


def test_unusable_client_certificate_fails_the_cycle_not_the_child(tmp_path: Path) -> None:
    """A client certificate path that does not exist: the cycle fails with a reason that names
    the setting, and the failure is recorded for ``edge-agent status``; nothing crashes."""
    config = Config(
        agent=AgentSection(state_dir=tmp_path / "state"),
        repository=RepositorySection(
            url="https://127.0.0.1:9",
            trusted_root=tmp_path / "root.json",
            client_cert=tmp_path / "missing-device.pem",
            client_key=tmp_path / "missing-device.key",
        ),
    )
    result = run_cycle(config)
    assert not result.ok
    assert "repository.ca_file, client_cert, client_key" in result.error
    assert "nothing fetched" in result.error
    state = StateDB(config.state_db)
    try:
        assert state.setting("last_update")["error"] == result.error
    finally:
        state.close()
