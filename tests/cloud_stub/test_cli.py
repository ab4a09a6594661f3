"""edge-cloud from the shell's point of view: init, publish (with int8), status, keys."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud_stub.cli import build_parser, main
from cloud_stub.repo import Repository
from tests.cli_help import help_problems
from tests.cloud_stub import terminal


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_keeps_keys_private_and_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "init", str(tmp_path / "repo"))
    assert code == 0
    assert "never serve this directory" in out
    keys = tmp_path / "repo" / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    files = list(keys.iterdir())
    assert len(files) == 4
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    public = tmp_path / "repo" / "public"
    assert not any(p.suffix == ".pem" for p in public.rglob("*"))
    code, _, err = run(capsys, "init", str(tmp_path / "repo"))
    assert code == 2
    assert "already holds a repository" in err


def test_publish_quantized_and_status(
    tmp_path: Path, mlp_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    run(capsys, "init", str(repo))
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32))
    code, out, err = run(
        capsys,
        "publish",
        str(repo),
        str(mlp_onnx),
        "--name",
        "clf",
        "--version",
        "1",
        "--quantize",
        "int8",
        "--calibration",
        str(calibration),
        "--rollout",
        "25",
    )
    assert code == 0, err
    assert "max abs error of int8 vs float on the calibration set" in out
    assert "rollout 25% of devices" in out
    target = next(t for _, t in Repository(repo).targets())
    assert target.custom["quantization"]["method"] == "int8-qdq"
    assert target.custom["rollout_bp"] == 2500
    code, out, _ = run(capsys, "status", str(repo), "--json")
    doc = json.loads(out)
    assert doc["roles"]["timestamp"]["version"] == 2
    assert doc["targets"][0]["path"] == "models/clf/1/model.onnx"


def test_publish_refuses_a_quantization_past_the_bound(
    tmp_path: Path, mlp_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    run(capsys, "init", str(repo))
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    code, _, err = run(
        capsys,
        "publish",
        str(repo),
        str(mlp_onnx),
        "--name",
        "clf",
        "--version",
        "1",
        "--quantize",
        "int8",
        "--calibration",
        str(calibration),
        "--max-error",
        "0.000001",
    )
    assert code == 2
    assert "past the bound of 1e-06; not published" in err
    assert list(Repository(repo).targets()) == []


def test_publish_refuses_older_versions_and_bad_files(
    tmp_path: Path, matmul_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    run(capsys, "init", str(repo))
    assert (
        run(capsys, "publish", str(repo), str(matmul_onnx), "--name", "m", "--version", "2")[0] == 0
    )
    code, _, err = run(
        capsys, "publish", str(repo), str(matmul_onnx), "--name", "m", "--version", "2"
    )
    assert code == 2
    assert "not newer than the published version 2" in err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, _, err = run(capsys, "publish", str(repo), str(junk), "--name", "m", "--version", "3")
    assert code == 2
    assert "junk.onnx" in err


def test_rotate_delegate_refresh_certs_and_operator_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    run(capsys, "init", str(repo))
    assert run(capsys, "rotate-key", str(repo), "root")[0] == 0
    assert (repo / "public" / "metadata" / "2.root.json").exists()
    assert (repo / "public" / "metadata" / "1.root.json").exists()
    code, out, _ = run(capsys, "delegate", str(repo), "vad")
    assert code == 0
    assert "model-vad" in out
    code, out, _ = run(capsys, "refresh", str(repo))
    assert "timestamp expires" in out
    code, out, _ = run(capsys, "certs", str(tmp_path / "pki"), "--device", "d1")
    assert (tmp_path / "pki" / "d1.pem").exists()
    assert stat.S_IMODE((tmp_path / "pki" / "d1.key").stat().st_mode) == 0o600
    code, out, _ = run(capsys, "operator-key", str(tmp_path / "ops"), "--id", "ops")
    assert stat.S_IMODE((tmp_path / "ops" / "ops.key").stat().st_mode) == 0o600
    assert "operator_keys" in out


@pytest.mark.parametrize(
    ("sig", "sigint_ignored"),
    [
        (signal.SIGINT, False),  # Ctrl-C in a terminal
        (signal.SIGINT, True),  # Ctrl-C to a script that started it with `&`
        (signal.SIGTERM, False),
    ],
    ids=["terminal-ctrl-c", "background-ctrl-c", "sigterm"],
)
def test_serve_stops_cleanly_on_a_signal_to_its_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sig: signal.Signals, sigint_ignored: bool
) -> None:
    """`edge-cloud serve` stops on SIGINT and SIGTERM sent to its process group, as a terminal
    sends Ctrl-C, also when it was started with SIGINT ignored; it exits 0 saying so."""
    repo, pki = tmp_path / "repo", tmp_path / "pki"
    run(capsys, "init", str(repo))
    run(capsys, "certs", str(pki))
    log = tmp_path / "serve.log"
    proc = terminal.start(
        [
            sys.executable,
            "-m",
            "cloud_stub.cli",
            "serve",
            str(repo),
            "--https",
            "127.0.0.1:0",
            *("--cert", str(pki / "server.pem"), "--key", str(pki / "server.key")),
        ],
        log,
        sigint_ignored=sigint_ignored,
    )
    terminal.wait_for_output(proc, log, "(Ctrl-C to stop)", terminal.BOUND_S)
    code, left = terminal.stop(proc, lambda pgid: os.killpg(pgid, sig))
    assert (code, left) == (0, []), terminal.tail(log)
    assert f"stopped serving {repo / 'public'} ({sig.name})" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_every_option_says_what_it_is_and_its_default() -> None:
    """Each subcommand's options and positionals have help, and help shows each default."""
    assert help_problems(build_parser()) == []


def test_the_help_check_catches_a_bare_option() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["serve"].add_argument("--bare", default=3)
    sub.choices["serve"].add_argument("--quiet", default=3, help="a default not shown")
    assert help_problems(parser) == [
        "edge-cloud serve --bare: no help",
        "edge-cloud serve --quiet: its default 3 is not said",
    ]


def test_the_docs_name_the_key_files_operator_key_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/mqtt.md's `--operator-key DIR/…` examples name a file `operator-key DIR` writes."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "mqtt.md").read_text()
    named = set(re.findall(r"--operator-key DIR/(\S+?)[`\s]", docs))
    assert named, "no --operator-key DIR/… example in docs/mqtt.md"
    run(capsys, "operator-key", str(tmp_path))
    written = {path.name for path in tmp_path.iterdir()}
    assert named <= written, (named, written)
