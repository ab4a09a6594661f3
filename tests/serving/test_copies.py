"""Large tensors are not copied on their way: the views each step hands on share memory with
the arrays and buffers before and after it (issue 13, deliverable 3)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.daemon import LocalModel
from agent.serving import reader as reader_module
from agent.serving.admission import ByteBudget
from agent.serving.client import AsyncInferenceClient, InferenceClient
from agent.serving.framing import Failure, Request, unsent
from agent.serving.oip.client import encode_request_parts
from agent.serving.oip.server import TAIL_BYTES, decode_infer_request, encode_response_parts
from agent.serving.reader import (
    DIRECT_BYTES,
    SMALL_BODY_BYTES,
    SPARE_BYTES,
    RequestReader,
    read_rest,
)
from agent.serving.response_reader import ResponseReader
from tests.serving.conftest import start_agent


def reader(delivered: list[Request]) -> RequestReader:
    return RequestReader(
        16384, 64 << 20, ByteBudget(256 << 20), delivered.append, lambda: True, lambda: None
    )


def receive(target: RequestReader, wire: bytes, step: int) -> list[Failure | None]:
    """What the loop does: read into ``buffer()`` (at most ``step`` bytes), then ``received``."""
    results = []
    offset = 0
    while offset < len(wire):
        space = target.buffer()
        count = min(step, len(space), len(wire) - offset)
        space[:count] = wire[offset : offset + count]
        space.release()
        offset += count
        results.append(target.received(count))
    return results


def request_wire(x: np.ndarray, target: str = "/v2/models/m/infer") -> bytes:
    parts, header_length = encode_request_parts({"x": x})
    body = b"".join(parts)
    head = (
        f"POST {target} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {header_length}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def test_client_parts_are_views_of_the_inputs() -> None:
    x = np.arange(300_000, dtype=np.float32).reshape(1, -1)
    parts, header_length = encode_request_parts({"x": x})
    assert len(parts) == 2
    assert header_length == len(parts[0])
    assert np.shares_memory(np.frombuffer(parts[1], np.float32), x)


def test_a_large_body_is_received_in_place_and_decoded_without_a_copy() -> None:
    x = np.random.default_rng(0).standard_normal((1, 400_000)).astype(np.float32)
    small = np.ones((1, 4), np.float32)
    wire = request_wire(x) + request_wire(small)  # the second pipelined behind
    delivered: list[Request] = []
    target = reader(delivered)
    in_place: list[object] = []
    original_buffer = target.buffer

    def spy() -> memoryview:
        view = original_buffer()
        if len(view) > DIRECT_BYTES:
            in_place.append(view.obj)
        return view

    target.buffer = spy  # type: ignore[method-assign]
    assert all(r is None for r in receive(target, wire, 200_000))
    assert [r.path for r in delivered] == ["/v2/models/m/infer"] * 2
    body = delivered[0].body
    assert in_place
    # The kernel wrote into the body (a large one's buffer, handed over as a view of it).
    owner = body.obj if isinstance(body, memoryview) else body
    assert any(obj is owner for obj in in_place)
    request = decode_infer_request(body, delivered[0].header_length)
    assert np.shares_memory(request.inputs[0].data, np.frombuffer(body, np.uint8))
    np.testing.assert_array_equal(request.inputs[0].data, x)
    second = decode_infer_request(delivered[1].body, delivered[1].header_length)
    np.testing.assert_array_equal(second.inputs[0].data, small)


def test_the_parser_after_a_body_received_in_place_is_a_fresh_one() -> None:
    x = np.zeros((1, 100_000), np.float32)
    wire = request_wire(x) + b"GARBAGE\r\n\r\n"
    delivered: list[Request] = []
    results = receive(reader(delivered), wire, 100_000)
    assert len(delivered) == 1
    failure = results[-1]
    assert isinstance(failure, Failure)
    assert failure.status == 400
    assert failure.message.startswith("malformed HTTP request")


def test_a_large_answer_is_its_arrays_and_is_received_in_place() -> None:
    y = np.arange(TAIL_BYTES, dtype=np.float32)
    body, tail, header_length = encode_response_parts("m", "1", None, [("y", y, True)])
    assert json.loads(body)["outputs"][0]["parameters"]["binary_data_size"] == y.nbytes
    assert len(tail) == 1
    assert np.shares_memory(np.frombuffer(tail[0], np.float32), y)
    replies = ResponseReader(1 << 30)
    size = len(body) + y.nbytes
    replies.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
    assert replies.next_response() is None
    space = replies.body_space()
    assert space is not None
    assert len(space) == y.nbytes
    space[:] = tail[0]
    buffer = space.obj
    space.release()
    replies.filled(y.nbytes)
    status, _, received = replies.next_response() or (0, {}, bytearray())
    assert status == 200
    assert received is buffer  # the body handed out is the buffer received into
    assert received[header_length:] == y.tobytes()


def test_large_tensors_both_ways_through_both_clients(tmp_path: Path, matmul_onnx: Path) -> None:
    """Megabytes in and out over the Unix socket and TCP: the bodies received in place and the
    answers written as views arrive whole and in order, pipelined behind small ones."""
    x = np.random.default_rng(3).standard_normal((6000, 64)).astype(np.float32)  # 1.5 MB
    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})[0]
    small = np.ones((1, 64), np.float32)
    for agent in start_agent([LocalModel("mm", matmul_onnx)], tmp_path / "s.sock"):
        for address in (str(agent.socket), agent.http):
            with InferenceClient(address) as client:
                for _ in range(3):
                    np.testing.assert_allclose(client.infer("mm", {"x": x})["y"], want, rtol=1e-5)
                    assert client.infer("mm", {"x": small})["y"].shape == (1, 64)

            async def twice(address: str = address) -> list[np.ndarray]:
                async with AsyncInferenceClient(address) as client:
                    return [(await client.infer("mm", {"x": x}))["y"] for _ in range(2)]

            for got in asyncio.run(twice()):
                np.testing.assert_allclose(got, want, rtol=1e-5)


def test_what_a_partial_write_leaves_is_the_rest_in_order() -> None:
    """An answer's parts go in one writev; what the socket did not take goes to the
    transport, from the first byte not written, as views (no copy)."""
    tensor = np.arange(8, dtype=np.float32)
    view = tensor.reshape(-1).data.cast("B")
    parts: list[bytes | memoryview] = [b"HTTP/1.1 200 OK\r\n\r\n{}", view, b"tail"]
    whole = b"".join(bytes(part) for part in parts)
    for sent in range(len(whole) + 1):
        rest = unsent(parts, sent)
        assert b"".join(bytes(part) for part in rest) == whole[sent:]
        assert all(len(part) for part in rest)
    first, *_ = unsent(parts, len(parts[0]) + 4)
    assert isinstance(first, memoryview) and np.shares_memory(np.asarray(first), tensor)


def test_only_the_first_bytes_of_a_large_request_go_through_the_scratch() -> None:
    """A new request's first read is small, so a face-sized body (196 KB, arriving whole in
    the socket) is not read into the scratch and then copied: all but its first few KiB are
    received in place."""
    x = np.random.default_rng(1).standard_normal((1, 128, 128, 3)).astype(np.float32)
    wire = request_wire(x)
    delivered: list[Request] = []
    target = reader(delivered)
    through_scratch = 0
    offset = 0
    while offset < len(wire):
        space = target.buffer()
        count = min(len(space), len(wire) - offset)  # the socket holds it all: reads fill up
        space[:count] = wire[offset : offset + count]
        if not isinstance(space.obj, bytearray):  # the scratch, not a body
            through_scratch += count
        space.release()
        offset += count
        assert target.received(count) is None
    assert len(delivered) == 1
    assert through_scratch <= 32 * 1024 < len(wire) // 6
    request = decode_infer_request(delivered[0].body, delivered[0].header_length)
    np.testing.assert_array_equal(request.inputs[0].data, x)


def test_the_rest_of_a_body_already_in_the_socket_is_read_in_the_same_turn() -> None:
    """After the first read, what the socket holds of a large body is read at once, into the
    body; what has not arrived is left for the loop's next turn, and so is the end of the
    stream."""
    x = np.random.default_rng(2).standard_normal((1, 30_000)).astype(np.float32)  # 120 KB
    wire = request_wire(x)
    delivered: list[Request] = []
    target = reader(delivered)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        half = len(wire) // 2
        theirs.sendall(wire[:half])
        space = target.buffer()  # the loop's first read
        count = ours.recv_into(space)
        space.release()
        assert target.received(count) is None and target.in_place
        assert read_rest(ours.fileno(), target) is None  # the first half read, then EAGAIN
        assert target.in_place and not delivered
        theirs.sendall(wire[half:])
        assert read_rest(ours.fileno(), target) is None
        assert not target.in_place and len(delivered) == 1
        request = decode_infer_request(delivered[0].body, delivered[0].header_length)
        np.testing.assert_array_equal(request.inputs[0].data, x)
        # A body cut short by the peer: read_rest stops at EOF; the transport sees it next.
        theirs.sendall(wire[:half])
        space = target.buffer()
        count = ours.recv_into(space)
        space.release()
        target.received(count)
        theirs.shutdown(socket.SHUT_WR)
        assert read_rest(ours.fileno(), target) is None
        assert target.in_place and len(delivered) == 1


def test_a_large_body_reuses_the_buffer_no_request_holds_any_more() -> None:
    """A face-sized body takes the buffer of the last body of its size once nothing refers to
    it, and a new one while anything does (an array made on it, the request itself): what a
    held request reads never changes under it."""
    delivered: list[Request] = []
    target = reader(delivered)
    rng = np.random.default_rng(4)
    first_x, second_x, third_x = (rng.standard_normal((1, 50_001), np.float32) for _ in "abc")
    receive(target, request_wire(first_x), 1 << 20)
    held = decode_infer_request(delivered[0].body, delivered[0].header_length).inputs[0].data
    first_buffer = id(delivered[0].body)
    delivered.clear()  # the request is gone; an array made on its body is still held
    receive(target, request_wire(second_x), 1 << 20)
    assert id(delivered[0].body) != first_buffer
    np.testing.assert_array_equal(held, first_x)  # untouched by the second request
    delivered.clear()
    del held  # nothing refers to the first buffer any more
    receive(target, request_wire(third_x), 1 << 20)
    assert id(delivered[0].body) == first_buffer
    request = decode_infer_request(delivered[0].body, delivered[0].header_length)
    np.testing.assert_array_equal(request.inputs[0].data, third_x)


def test_buffers_kept_for_reuse_are_bounded_in_all_and_small_bodies_not_kept() -> None:
    delivered: list[Request] = []
    target = reader(delivered)
    for size in range(SMALL_BODY_BYTES // 4 - 100, SPARE_BYTES // 4 * 3, 40_000):
        receive(target, request_wire(np.zeros((1, size), np.float32)), 1 << 20)
        delivered.clear()
    kept = reader_module._threads.spares
    assert kept and sum(len(buffer) for buffer in kept.values()) <= SPARE_BYTES
    assert all(len(buffer) > SMALL_BODY_BYTES for buffer in kept.values())
