"""Python client for the agent's inference socket: numpy in, numpy out, binary by default.

One persistent HTTP/1.1 connection per client, framed by hand (the server always answers with
Content-Length; ``response_reader`` reads the answers for both clients), so a call costs one
``sendmsg`` (the head, the JSON header and views of the tensors, never joined) and as few
``recv`` calls as the reply needs (a large body is received straight into its buffer).
Not thread-safe: use one client per thread. ``AsyncInferenceClient`` is the asyncio version.

    with InferenceClient("/run/edge-agent/infer.sock") as client:
        outputs = client.infer("detector", {"input": image})
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import Any
from urllib.parse import quote

import numpy as np

from agent.serving.oip import client as oip
from agent.serving.oip.codec import Buffer, Limits
from agent.serving.response_reader import (
    MAX_HEAD,
    ClientError,
    Reply,
    ResponseReader,
    error_for,
)
from agent.serving.sending import RequestHttpHeads, send_request
from agent.serving.shm.calls import SHM_PATH, SharedMemoryCalls
from agent.serving.shm.client import LocalRegions, PlacedTensor
from agent.serving.spin import DEFAULT_SPIN_US, Rehearsal, SpinPolicy, WaitPlan, nap

__all__ = ["DEFAULT_SOCKET", "AsyncInferenceClient", "ClientError", "InferenceClient"]

DEFAULT_SOCKET = "/run/edge-agent/infer.sock"
_CHUNK = 256 * 1024
_IN_PLACE_BYTES = 16 * 1024  # a body's rest larger than this is received in place


class InferenceClient(SharedMemoryCalls):
    """Synchronous client. ``address`` is a Unix socket path or ``http://host:port``.

    While it waits for a reply the client polls its socket for up to ``spin_us`` microseconds
    before it blocks (``agent.serving.spin``): a small model then answers in about a third
    less time on a VM, at the price of that much CPU per call. For slower models it sleeps until
    the reply is nearly due and polls from there. The policy stops spinning by itself for
    replies that come later than its poll and on single-CPU machines; ``spin_us=0`` turns it
    off.
    """

    def __init__(
        self,
        address: str = DEFAULT_SOCKET,
        *,
        timeout_s: float = 30.0,
        max_response_bytes: int = 256 * 1024 * 1024,
        spin_us: float = DEFAULT_SPIN_US,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.spin = SpinPolicy(spin_us)
        self._rehearsal = Rehearsal()  # what the poll also does (spin.py)
        self._sleep_until = 0.0
        self._spin_until = 0.0
        self._spin_s = 0.0
        self._blocked = False
        self._sent = 0.0
        self._waited: float | None = None
        self._sock: socket.socket | None = None
        self._replies = ResponseReader(max_response_bytes)
        self._chunk = bytearray(_CHUNK)
        self._chunk_view = memoryview(self._chunk)
        self._limits = Limits(max_body_bytes=max_response_bytes)
        self._regions = LocalRegions()  # shared-memory regions registered, by name
        self._plans = oip.ResponsePlans()  # checked headers of the agent's repeated answers
        self._heads = oip.RequestHeads()  # and the headers of our repeated requests
        self._http_heads = RequestHttpHeads()  # and their HTTP heads

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        address = self.address
        sock: socket.socket | None = None
        try:
            if address.startswith("http://"):
                host, _, port = address[len("http://") :].rstrip("/").rpartition(":")
                sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout_s)
                sock.connect(address)
            # A kernel-side timeout instead of Python's: each recv/send is then one system
            # call, not a poll() followed by the call (about 10% of a small request).
            sock.settimeout(None)
            timeval = struct.pack("ll", int(self.timeout_s), int(self.timeout_s % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise ClientError(
                f"cannot connect to the agent at {address}: {exc.strerror or exc}",
                remedy="is edge-agent running, and are you in its socket group?",
            ) from exc
        self._replies.clear()
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- HTTP -------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Buffer | Sequence[Buffer] = b"",
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        """Send one request on the persistent connection; reconnect once if it went stale.
        ``body`` may be given as its parts (sent one after the other, not joined)."""
        parts = [body] if isinstance(body, bytes | memoryview) else list(body)
        payload = [self._http_heads.head(method, path, parts, extra_headers), *parts]
        for attempt in (0, 1):
            fresh = self._sock is None
            if self._sock is None:
                self._sock = self._connect()
                if self._regions.by_name and not path.startswith(SHM_PATH):
                    # The agent dropped our regions with the old connection.
                    for region in self._regions.by_name.values():
                        self._register(region)
            try:
                try:
                    send_request(self._sock, payload)
                except (BrokenPipeError, ConnectionResetError):
                    # The agent may have answered before it stopped reading (a 503 for a
                    # body it cannot buffer, a 413): that answer, not the broken pipe.
                    early = self._answer_before_close()
                    if early is None:
                        raise
                    self.close()
                    return early
                plan = self.spin.plan()
                self._await(plan)
                response = self._read_response()
                waited = self._waited if self._waited is not None else 0.0
                self.spin.observe(waited_s=waited, spun=plan.spin_s > 0, hit=not self._blocked)
                return response
            except (ConnectionError, _StaleConnectionError) as exc:
                self.close()
                # A kept-alive connection the server closed while idle: retry once, fresh.
                if fresh or attempt:
                    raise ClientError(f"connection to {self.address} broke: {exc}") from exc
            except (TimeoutError, BlockingIOError) as exc:  # SO_RCVTIMEO expiry is EAGAIN
                self.close()
                raise ClientError(
                    f"no answer from {self.address} within {self.timeout_s} s"
                ) from exc
        raise AssertionError("unreachable")

    def _answer_before_close(self) -> Reply | None:
        """A whole answer already sent by the agent on a connection it closed, if any."""
        self._await(WaitPlan())
        try:
            return self._read_response()
        except (OSError, _StaleConnectionError, ClientError):
            return None

    def _await(self, plan: WaitPlan) -> None:
        self._sent = now = time.perf_counter()
        self._waited = None
        self._blocked = False
        self._sleep_until = now + plan.sleep_s if plan.sleep_s else 0.0
        # After a nap the poll's end is set again from when the nap ended (_recv_more).
        self._spin_until = now + plan.spin_s if plan.spin_s else 0.0
        self._spin_s = plan.spin_s

    def _recv_more(self) -> None:
        sock = self._sock
        assert sock is not None
        if self._sleep_until:  # until the poll is due, woken at once by the reply
            nap(sock.fileno(), self._sleep_until - time.perf_counter())
            self._sleep_until = 0.0
            if self._spin_until:  # the poll's budget starts when the nap really ended
                self._spin_until = time.perf_counter() + self._spin_s
        # The rest of a body of some size straight into its buffer, no copy after the kernel's;
        # anything else into a reused buffer (recv(n) allocates n bytes per call).
        space = self._replies.body_space()
        into = space if space is not None and len(space) > _IN_PLACE_BYTES else self._chunk_view
        try:
            count = self._receive(sock, into)
        finally:
            if space is not None:
                space.release()
        if not count:
            raise _StaleConnectionError("the agent closed the connection")
        if self._waited is None:
            self._waited = time.perf_counter() - self._sent
        if into is space:
            self._replies.filled(count)
        else:
            self._replies.feed(self._chunk_view[:count])

    def _receive(self, sock: socket.socket, into: memoryview) -> int:
        """One receive, polled until the poll's end (``spin``), then blocking."""
        if self._spin_until:
            while True:
                try:
                    return sock.recv_into(into, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if self._rehearsal.run():  # the poll's time put to use, once
                        continue
                    if time.perf_counter() >= self._spin_until:
                        self._spin_until = 0.0
                        self._blocked = True
                        return sock.recv_into(into)
        return sock.recv_into(into)

    def _read_response(self) -> Reply:
        replies = self._replies
        while (reply := replies.next_response()) is None:
            self._recv_more()
        if reply[1].get("connection", "").lower() == "close":
            self.close()
        return reply

    def _json(self, method: str, path: str, body: bytes = b"") -> Any:
        status, _, payload = self.request(method, path, body)
        if status != 200:
            raise error_for(status, oip.decode_error(payload))
        return json.loads(payload)

    # -- API --------------------------------------------------------------------------------

    def live(self) -> bool:
        return self.request("GET", "/v2/health/live")[0] == 200

    def ready(self) -> bool:
        return self.request("GET", "/v2/health/ready")[0] == 200

    def server_metadata(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/v2")
        return result

    def model_metadata(self, name: str, version: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", self._model_path(name, version))
        return result

    def model_ready(self, name: str, version: int | None = None) -> bool:
        return self.request("GET", self._model_path(name, version) + "/ready")[0] == 200

    def repository_index(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("POST", "/v2/repository/index", b"{}")
        return result

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/agent/status")
        return result

    def metrics(self) -> str:
        status, _, body = self.request("GET", "/metrics")
        if status != 200:
            raise error_for(status, oip.decode_error(body))
        return body.decode()

    def infer(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray[Any, Any] | PlacedTensor],
        outputs: Sequence[str] | None = None,
        *,
        version: int | None = None,
        binary: bool = True,
        request_id: str | None = None,
        output_regions: Mapping[str, PlacedTensor] | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run ``name`` on ``inputs``; returns the outputs by name.

        Raises:
            RequestError, NotFoundError, UnavailableError, InferenceError: as the agent answered.
            ClientError: the agent could not be reached.
        """
        response = self.infer_full(
            name,
            inputs,
            outputs,
            version=version,
            binary=binary,
            request_id=request_id,
            output_regions=output_regions,
        )
        return response.outputs

    def infer_full(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray[Any, Any] | PlacedTensor],
        outputs: Sequence[str] | None = None,
        *,
        version: int | None = None,
        binary: bool = True,
        request_id: str | None = None,
        output_regions: Mapping[str, PlacedTensor] | None = None,
    ) -> oip.InferResponse:
        """Like ``infer`` but returns the whole response (model version, id). Inputs given
        as ``PlacedTensor`` are read by the agent from a registered region; outputs in
        ``output_regions`` are written there, and returned as views of the region."""
        body, header_length = oip.encode_request_parts(
            inputs,
            outputs,
            binary=binary,
            binary_output=binary,
            request_id=request_id,
            output_regions=output_regions,
            heads=self._heads,
        )
        extra = (
            [("Inference-Header-Content-Length", str(header_length))]
            if header_length is not None
            else []
        )
        self._rehearsal.arm()
        status, headers, payload = self.request(
            "POST", self._model_path(name, version) + "/infer", body, extra
        )
        if status != 200:
            raise error_for(status, oip.decode_error(payload))
        raw_length = headers.get("inference-header-content-length")
        decode = partial(
            oip.decode_infer_response,
            payload,
            int(raw_length) if raw_length else None,
            self._limits,
            self._regions,
            self._plans,
        )
        self._rehearsal.keep((self._replies.rehearse, decode), len(payload))
        return decode()

    @staticmethod
    def _model_path(name: str, version: int | None) -> str:
        path = f"/v2/models/{quote(name, safe='')}"
        return path if version is None else f"{path}/versions/{version}"


class _StaleConnectionError(Exception):
    """The server closed a kept-alive connection."""


class AsyncInferenceClient:
    """The asyncio twin of ``InferenceClient``: one persistent connection, calls serialised.

    async with AsyncInferenceClient("/run/edge-agent/infer.sock") as client:
        outputs = await client.infer("detector", {"input": image})
    """

    def __init__(
        self,
        address: str = DEFAULT_SOCKET,
        *,
        timeout_s: float = 30.0,
        max_response_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._replies = ResponseReader(max_response_bytes)
        self._lock = asyncio.Lock()
        self._limits = Limits(max_body_bytes=max_response_bytes)
        self._plans = oip.ResponsePlans()
        self._heads = oip.RequestHeads()
        self._http_heads = RequestHttpHeads()

    async def _connect(self) -> None:
        try:
            if self.address.startswith("http://"):
                host, _, port = self.address[len("http://") :].rstrip("/").rpartition(":")
                connect = asyncio.open_connection(host, int(port), limit=MAX_HEAD)
            else:
                connect = asyncio.open_unix_connection(self.address, limit=MAX_HEAD)
            async with asyncio.timeout(self.timeout_s):
                self._reader, self._writer = await connect
        except (OSError, TimeoutError) as exc:
            raise ClientError(f"cannot connect to the agent at {self.address}: {exc}") from exc
        self._replies.clear()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._reader = self._writer = None

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Buffer | Sequence[Buffer] = b"",
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        parts = [body] if isinstance(body, bytes | memoryview) else list(body)
        payload = [self._http_heads.head(method, path, parts, extra_headers), *parts]
        async with self._lock:
            for attempt in (0, 1):
                fresh = self._writer is None
                if fresh:
                    await self._connect()
                assert self._reader is not None
                assert self._writer is not None
                try:
                    for part in payload:  # not joined (writelines would join them)
                        self._writer.write(part)
                    async with asyncio.timeout(self.timeout_s):
                        return await self._read(self._reader)
                except (ConnectionError, _StaleConnectionError) as exc:
                    await self.close()
                    if fresh or attempt:
                        raise ClientError(f"connection to {self.address} broke: {exc}") from exc
                except TimeoutError as exc:
                    await self.close()
                    raise ClientError(
                        f"no answer from {self.address} within {self.timeout_s} s"
                    ) from exc
        raise AssertionError("unreachable")

    async def _read(self, reader: asyncio.StreamReader) -> Reply:
        replies = self._replies
        while (reply := replies.next_response()) is None:
            data = await reader.read(_CHUNK)
            if not data:
                raise _StaleConnectionError("the agent closed the connection")
            replies.feed(data)
        if reply[1].get("connection", "").lower() == "close":
            await self.close()
        return reply

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        outputs: Sequence[str] | None = None,
        *,
        version: int | None = None,
        binary: bool = True,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Like ``InferenceClient.infer``."""
        body, header_length = oip.encode_request_parts(
            inputs, outputs, binary=binary, binary_output=binary, heads=self._heads
        )
        extra = (
            [("Inference-Header-Content-Length", str(header_length))]
            if header_length is not None
            else []
        )
        path = InferenceClient._model_path(name, version) + "/infer"
        status, headers, payload = await self.request("POST", path, body, extra)
        if status != 200:
            raise error_for(status, oip.decode_error(payload))
        raw_length = headers.get("inference-header-content-length")
        response = oip.decode_infer_response(
            payload, int(raw_length) if raw_length else None, self._limits, None, self._plans
        )
        return response.outputs

    async def ready(self) -> bool:
        return (await self.request("GET", "/v2/health/ready"))[0] == 200
