"""The update child's lines to the daemon (``agent.delivery.pipe``): the codec and its bounds,
the splitter, and the daemon's side over real child processes: a real update cycle whose
download progress reaches the status board (no polling of ``.partial/``), and a child that
writes lines that are not ours."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest

from agent.activity import Activity
from agent.config import load as load_config
from agent.delivery import pipe
from agent.delivery.pipe import LineSplitter, PipeError, Progress, decode, encode
from agent.delivery.report import CycleReport, DeliveryEvent
from agent.models.slots import Slots
from agent.parts.status import StatusBoard
from agent.updates import UpdateLoop, teller
from cloud_stub.certs import Pki
from cloud_stub.https import RepositoryServer
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model

# -- the codec ------------------------------------------------------------------------------


def test_each_kind_round_trips() -> None:
    progress = Progress("mm", 3, 65536, 1 << 20)
    assert decode(encode(progress)) == progress
    event = DeliveryEvent("installed", "mm", 3, "verified and stored")
    assert decode(encode(event)) == event
    assert decode(encode(DeliveryEvent("rejected", "mm", None, "no signature"))).version is None
    report = CycleReport(installed=[("mm", 3)], rejected=[("mm", 2, "bad hash")], finished=5.0)
    back = decode(encode(report))
    assert isinstance(back, CycleReport)
    assert (back.installed, back.rejected, back.finished, back.ok) == (
        [("mm", 3)],
        [("mm", 2, "bad hash")],
        5.0,
        True,
    )
    failed = decode(encode(CycleReport.failed("offline", 1.0)))
    assert isinstance(failed, CycleReport) and failed.error == "offline"
    assert encode(progress).endswith(b"\n") and encode(progress).count(b"\n") == 1


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object but list"),
        (b'{"kind": "telemetry"}', "unknown kind 'telemetry' (expected one of event, progress"),
        (b'{"model": "mm"}', "unknown kind None"),
        (b'{"kind": "progress", "model": "mm", "version": 1, "done": 1}', "total is not an int"),
        (
            b'{"kind": "progress", "model": "mm", "version": 1, "done": 9, "total": 4}',
            "done 9 is over total 4",
        ),
        (
            b'{"kind": "progress", "model": "mm", "version": -1, "done": 0, "total": 4}',
            "version -1 is out of range",
        ),
        (
            b'{"kind": "progress", "model": "mm", "version": true, "done": 0, "total": 4}',
            "version is not an integer",
        ),
        (b'{"kind": "event", "model": "mm", "version": 1, "reason": ""}', "event is not a str"),
        (
            b'{"kind": "event", "model": 7, "version": 1, "event": "x", "reason": ""}',
            "model is not a string",
        ),
        (b'{"kind": "summary", "installed": "mm"}', "summary: installed is not a list"),
        (b'{"kind": "summary", "installed": [{"model": "mm"}]}', "summary: KeyError"),
    ],
)
def test_what_is_not_ours_is_a_precise_error(line: bytes, error: str) -> None:
    with pytest.raises(PipeError) as raised:
        decode(line)
    assert error in str(raised.value)


def test_bounds_on_texts_and_lines() -> None:
    long = "r" * (pipe.MAX_TEXT_CHARS + 1)
    doc = {"kind": "event", "model": "mm", "version": 1, "event": "failed", "reason": long}
    with pytest.raises(PipeError, match="reason has 16385 characters, over 16384"):
        decode(json.dumps(doc).encode())
    # The child cuts a reason to the bound (the database keeps it whole) instead of losing it.
    told = decode(encode(DeliveryEvent("failed", "mm", 1, long)))
    assert isinstance(told, DeliveryEvent) and told.reason == long[: pipe.MAX_TEXT_CHARS]
    with pytest.raises(PipeError, match="over 1048576"):
        decode(b" " * (pipe.MAX_LINE_BYTES + 2))
    many = CycleReport(rejected=[("m" * 100, i, "x" * 1000) for i in range(2000)])
    with pytest.raises(PipeError, match=r"a summary line of .* bytes is over 1048576"):
        encode(many)


def test_the_splitter_gives_whole_lines_under_any_split_and_drops_long_ones() -> None:
    data = b'{"a":1}\n{"b":2}\n' + b"x" * 50 + b"\n" + b'{"c":3}\n' + b"tail"
    for size in (1, 2, 3, 7, 64, len(data)):
        splitter = LineSplitter(max_bytes=20)
        lines = []
        for i in range(0, len(data), size):
            lines += splitter.feed(data[i : i + size])
        assert lines == [b'{"a":1}', b'{"b":2}', b'{"c":3}'], size
        assert splitter.dropped == 1
        assert splitter.close() == b"tail"
        assert splitter.close() == b""
    # A line exactly at the bound passes; one byte more does not, and nothing of it is held.
    splitter = LineSplitter(max_bytes=4)
    assert splitter.feed(b"abcd\nabcde") == [b"abcd"]
    assert splitter.feed(b"fgh\nok\n") == [b"ok"] and splitter.dropped == 1
    assert len(splitter._buffer) == 0


# -- the daemon's side, over real children ----------------------------------------------------


def test_a_real_childs_download_progress_reaches_the_status_board(tmp_path: Path, pki: Pki) -> None:
    """A real update cycle (``python -I -m agent update --once --json``) over HTTPS downloads
    a 1 MiB model: the daemon's status board shows the download as the child tells it, with
    its bytes so far and its signed size, then the events, then the cycle's summary. Nothing
    looks at ``.partial/``."""
    repo = Repository.init(tmp_path / "repo")
    model = matmul_model(tmp_path / "big.onnx", k=512, n=512, seed=1)
    publish(repo, model, "mm", 1, log=lambda *_: None)
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
        '[models]\nfollow = ["mm"]\n'
        f'[repository]\nurl = "{server.url}"\n'
        f'trusted_root = "{repo.metadata_dir / "1.root.json"}"\nca_file = "{pki.ca_cert}"\n'
    )
    config = load_config(config_file)
    shown: list[Activity] = []
    told: list[DeliveryEvent] = []

    async def deploy(_report: CycleReport) -> None:
        pass

    async def main() -> CycleReport:
        board = StatusBoard(Slots())
        updates = UpdateLoop(config, deploy)
        board.updates = updates
        publish_status = board.publish

        def recording() -> None:  # what the board held at each STATUS= it sent
            shown.extend(board.activities())
            publish_status()

        board.publish = recording  # type: ignore[method-assign]
        updates.on_activity = board.on_update_activity
        updates.on_progress = board.on_download
        updates.on_event = lambda event: (told.append(event), board.on_delivery_event(event))[1]
        result = await updates.run_once()
        assert board.download is None  # the download ended with its events
        return result

    try:
        result = asyncio.run(main())
    finally:
        server.stop()
    assert result.ok, result.error
    assert result.installed == [("mm", 1)]
    downloads = [a for a in shown if a.what == "downloading version"]
    size = (tmp_path / "state" / "models" / "mm" / "1" / "model.onnx").stat().st_size
    assert size > 1 << 20
    assert {(a.model, a.version, a.bytes_total) for a in downloads} == {("mm", 1, size)}
    done = [a.bytes_done for a in downloads]
    assert done == sorted(done) and len(set(done)) >= 10  # as it went, ~64 KiB at a time
    assert all(d is not None and d < size for d in done)
    assert "downloading mm version 1 (" in downloads[-1].text
    assert [(e.kind, e.name, e.version) for e in told if e.kind != "up_to_date"] == [
        ("downloaded", "mm", 1),
        ("installed", "mm", 1),
    ]


def test_lines_that_are_not_ours_are_logged_and_the_cycle_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A child (a real process standing in for the update child) that writes garbage, an
    unknown kind, a line over the bound and a line without its newline around real lines: each
    bad line is logged and dropped, the good ones are acted on, and the summary counts."""
    good_progress = encode(Progress("mm", 2, 10, 100)).decode()
    summary = encode(CycleReport(installed=[("mm", 2)], finished=1.0)).decode()
    script = tmp_path / "child"
    script.write_text(
        "#!/bin/sh\n"
        "printf 'garbage\\n'\n"
        "printf '%s\\n' '{\"kind\": \"telemetry\"}'\n"
        f"head -c {pipe.MAX_LINE_BYTES + 10} /dev/zero | tr '\\0' 'x'; printf '\\n'\n"
        f"printf '%s' '{good_progress}'\n"
        f"printf '%s' '{summary.strip()}'\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    progress: list[Progress] = []

    async def deploy(_report: CycleReport) -> None:
        pass

    async def main() -> tuple[CycleReport, int]:
        updates = UpdateLoop(load_config(config_file), deploy)
        updates.on_progress = progress.append
        result = await updates.run_once()
        return result, updates.malformed

    with caplog.at_level(logging.WARNING, logger="agent.updates"):
        result, malformed = asyncio.run(main())
    assert result.ok and result.installed == [("mm", 2)]
    assert progress == [Progress("mm", 2, 10, 100)]
    assert malformed == 3
    logged = caplog.text
    assert "update child: line dropped: not JSON" in logged
    assert "unknown kind 'telemetry'" in logged
    assert "1 line(s) over 1048576 bytes dropped" in logged


def test_a_child_without_a_summary_is_a_failed_cycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "child"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')

    async def deploy(_report: CycleReport) -> None:
        pass

    result = asyncio.run(UpdateLoop(load_config(config_file), deploy)._child())
    assert not result.ok
    assert result.error == "update child exited with 3 and no valid summary"


def test_the_child_writes_one_line_per_message() -> None:
    import io

    out = io.StringIO()
    tell = teller(out)
    tell(Progress("mm", 1, 0, 10))
    tell(DeliveryEvent("installed", "mm", 1, "ok"))
    tell(CycleReport(installed=[("mm", 1)]))
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["progress", "event", "summary"]
