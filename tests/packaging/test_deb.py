"""The .deb: build it, install it into a scratch root with dpkg, serve an inference with the
installed agent, upgrade keeping state and configuration, purge; and the arm64 build."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from agent.errors import UnavailableError
from agent.serving.client import ClientError, InferenceClient

from .debs import build


@pytest.fixture(scope="module")
def amd64_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("amd64", tmp_path_factory.mktemp("deb"))


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [
            "dpkg",
            f"--root={root}",
            "--force-script-chrootless",
            "--force-depends",
            "--force-not-root",
            "--force-confold",
            "--log=/dev/null",
            *args,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def newer_version(deb: Path, work: Path, version: str) -> Path:
    """The same package under a newer version number: what an upgrade installs."""
    work.mkdir()
    tree = work / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(
        re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.M)
    )
    out = work / f"edge-agent_{version}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "--root-owner-group", "-b", str(tree), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def installed_version(root: Path) -> str:
    return subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Version}", "edge-agent"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def scratch_root(path: Path) -> Path:
    for sub in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "var/lib/dpkg/status").touch()
    (path / "var/lib/dpkg/available").touch()
    return path


def test_install_serve_upgrade_purge(amd64_deb: Path, tmp_path: Path, matmul_onnx: Path) -> None:
    root = scratch_root(tmp_path / "root")
    dpkg(root, "-i", str(amd64_deb))
    agent = root / "opt/edge-agent/bin/edge-agent"
    assert (root / "lib/systemd/system/edge-agent.service").exists()
    assert re.search(r"^edge-agent:", (root / "etc/passwd").read_text(), re.M)
    assert (root / "var/lib/edge-agent").is_dir()
    # The daemon's bytecode without docstrings, which its own user could not write
    assert list(
        (root / "opt/edge-agent/venv").glob(
            "lib/python3*/site-packages/agent/__pycache__/daemon.*.opt-nodoc.pyc"
        )
    )
    # The installed agent, from its own virtualenv, serves an inference through its socket,
    # and over gRPC when asked: the package installs the [grpc] extra from its wheelhouse.
    sock, grpc_sock = tmp_path / "infer.sock", tmp_path / "grpc.sock"
    command = [str(agent), "serve", f"mm={matmul_onnx}", "--socket", str(sock)]
    serve = subprocess.Popen(
        [*command, "--grpc-socket", str(grpc_sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with InferenceClient(str(sock)) as client:
                    out = client.infer("mm", {"x": np.ones((1, 64), np.float32)})
                break
            except (ClientError, UnavailableError):
                assert time.monotonic() < deadline, "the installed agent did not serve"
                time.sleep(0.2)
        assert out["y"].shape == (1, 64)
        grpc_client = triton.InferenceServerClient(url=f"unix:{grpc_sock}")
        x = triton.InferInput("x", [2, 64], "FP32")
        x.set_data_from_numpy(np.ones((2, 64), np.float32))
        y = grpc_client.infer("mm", [x]).as_numpy("y")
        np.testing.assert_allclose(y, np.repeat(out["y"], 2, axis=0), rtol=1e-5, atol=1e-5)
        assert grpc_client.get_model_config("mm").config.max_batch_size == 0
    finally:
        serve.terminate()
        serve.wait(20)
    # An upgrade keeps the operator's configuration and the device's state.
    config = root / "etc/edge-agent/agent.toml"
    config.write_text(config.read_text().replace('fleet = "default"', 'fleet = "site-7"'))
    (root / "var/lib/edge-agent/state.db").write_bytes(b"state")
    before = (root / "opt/edge-agent/venv").readlink()
    dpkg(root, "-i", str(newer_version(amd64_deb, tmp_path / "newer", "0.1.0+1")))
    assert installed_version(root) == "0.1.0+1"  # a real upgrade, not a reinstall
    assert 'fleet = "site-7"' in config.read_text()
    assert (root / "var/lib/edge-agent/state.db").read_bytes() == b"state"
    assert (root / "opt/edge-agent/venv").readlink() != before
    assert (
        subprocess.run(
            [str(agent), "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "edge-agent 0.1.0"
    )
    # Remove takes the package and its virtualenvs, leaving nothing in /opt; purge also
    # removes state and configuration.
    dpkg(root, "-r", "edge-agent")
    assert not (root / "opt/edge-agent").exists()
    assert (root / "var/lib/edge-agent/state.db").exists()
    assert config.exists()
    dpkg(root, "--purge", "edge-agent")
    assert not (root / "var/lib/edge-agent").exists()
    assert not (root / "etc/edge-agent").exists()
    assert not (root / "opt/edge-agent").exists()


def test_arm64_package_carries_only_arm64_wheels(tmp_path: Path) -> None:
    deb = build("arm64", tmp_path)
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert fields == "arm64"
    extract = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(extract)], check=True)
    wheels = sorted((extract / "opt/edge-agent/wheelhouse").glob("*.whl"))
    names = [w.name for w in wheels]
    assert any(n.startswith("onnxruntime-") for n in names)
    assert any(n.startswith("ai_edge_litert-") for n in names)
    assert any(n.startswith("grpcio-") for n in names)  # the [grpc] extra
    native = 0
    for wheel in wheels:
        tags = wheel.name[:-4].split("-")[-1]
        with zipfile.ZipFile(wheel) as archive:
            assert archive.testzip() is None
            libraries = [n for n in archive.namelist() if re.search(r"\.so(\.[\d.]+)?$", n)]
            if tags == "any":
                assert libraries == [], f"{wheel.name} is tagged pure but carries {libraries}"
                continue
            assert "aarch64" in tags, f"{wheel.name} is not an arm64 wheel"
            for name in libraries:
                with archive.open(name) as member:
                    assert elf_machine(member.read(20)) == EM_AARCH64, f"{wheel.name}: {name}"
                native += 1
    assert native >= 10  # onnxruntime, numpy, LiteRT, httptools, cryptography …


EM_AARCH64 = 183


def elf_machine(header: bytes) -> int:
    """``e_machine`` of an ELF header (the architecture the code is for)."""
    assert header[:4] == b"\x7fELF", "not an ELF file"
    order = "little" if header[5] == 1 else "big"
    return int.from_bytes(header[18:20], order)


def test_elf_machine_reads_the_architecture() -> None:
    assert elf_machine(Path(sys.executable).resolve().read_bytes()[:20]) in (62, EM_AARCH64)
    x86 = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x03\x00" + (62).to_bytes(2, "little")
    assert elf_machine(x86) == 62
