"""systemd integration: the notify protocol over a real datagram socket, socket activation,
the unit's verification and hardening score, sysusers/tmpfiles, and the runtimes under W^X."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import systemd
from agent.config import load
from agent.errors import EXIT_CONFIG

UNITS = Path(__file__).resolve().parents[2] / "systemd"


@pytest.fixture
def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    return sock


def test_notify_messages(notify_socket: socket.socket, tmp_path: Path) -> None:
    notifier = systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert notifier.enabled
    assert notifier.ready("serving vad v3")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving vad v3"
    notifier.watchdog_ping()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    notifier.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", notify_socket.recv(4096))
    notifier.close()
    notify_socket.close()


def test_abstract_notify_socket() -> None:
    name = f"edge-agent-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = systemd.Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("downloading")
        assert sock.recv(4096) == b"STATUS=downloading"
        notifier.close()


def test_noop_outside_systemd() -> None:
    notifier = systemd.Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_period() is None


def test_watchdog_period_honours_pid() -> None:
    import os

    assert systemd.Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_period() == 30.0
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.Notifier(mine).watchdog_period() == 2.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
    assert systemd.Notifier(other).watchdog_period() is None


def test_listen_fds_from_a_real_socket(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    script = textwrap.dedent(
        f"""
        import os, sys
        os.dup2({listener.fileno()}, 3)  # where systemd puts the first passed socket
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = "1"
        from agent import systemd
        socks = systemd.listen_fds()
        assert len(socks) == 1 and "LISTEN_FDS" not in os.environ
        conn, _ = socks[0].accept()
        conn.sendall(b"hello from fd 3")
        """
    )

    child = subprocess.Popen([sys.executable, "-c", script], pass_fds=(listener.fileno(),))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(path))
        assert client.recv(100) == b"hello from fd 3"
    assert child.wait(10) == 0
    listener.close()


def test_agent_sends_ready_with_status(tmp_path: Path, matmul_onnx: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "serve",
            f"mm={matmul_onnx}",
            "--socket",
            str(tmp_path / "s.sock"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert notify.recv(4096) == b"STATUS=loading models"
        # `serve` has no deployer: the status names the versions, nothing else.
        assert notify.recv(4096) == b"READY=1\nSTATUS=serving mm v1"
        proc.terminate()
        assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def unit_settings(path: Path, section: str) -> dict[str, list[str]]:
    """``Key=value`` lines of one section of a unit file; a key may repeat."""
    settings: dict[str, list[str]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if current == section:
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_a_config_error_exits_with_the_code_the_unit_does_not_restart_on(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[serving]\nworkers = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "serving" in result.stderr and "workers" in result.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert missing.returncode == EXIT_CONFIG, missing.stderr
    service = unit_settings(UNITS / "edge-agent.service", "Service")
    prevented = {int(code) for line in service["RestartPreventExitStatus"] for code in line.split()}
    assert EXIT_CONFIG in prevented
    assert service["Restart"] == ["on-failure"]


def test_time_sync_is_ordered_after_not_pulled_in() -> None:
    """systemd.special(7): services that need an accurate clock order themselves after
    time-sync.target but do not pull it in (only the NTP service does)."""
    unit = unit_settings(UNITS / "edge-agent.service", "Unit")
    after = " ".join(unit["After"]).split()
    assert "time-sync.target" in after and "network-online.target" in after
    for pulls in ("Wants", "Requires", "Requisite", "BindsTo"):
        assert "time-sync.target" not in " ".join(unit.get(pulls, [])).split(), pulls
    assert "network-online.target" in " ".join(unit["Wants"]).split()


def _unit_copy(tmp_path: Path) -> Path:
    text = (UNITS / "edge-agent.service").read_text()
    # verify checks that ExecStart exists; point it at this test's interpreter.
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace("/opt/edge-agent/bin/edge-agent", sys.executable))
    shutil.copy(UNITS / "edge-agent.socket", tmp_path / "edge-agent.socket")
    return unit


def test_units_verify_clean(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    unit = _unit_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit), str(tmp_path / "edge-agent.socket")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_hardening_exposure_at_most_2() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNITS / "edge-agent.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for edge-agent.service: ([\d.]+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= 2.0


def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(UNITS / "edge-agent.sysusers")],
        check=True,
        capture_output=True,
    )
    passwd = (root / "etc" / "passwd").read_text()
    group = (root / "etc" / "group").read_text()
    assert re.search(r"^edge-agent:x:\d+:\d+:", passwd, re.M)
    assert re.search(r"^edge-infer:x:\d+:edge-agent$", group, re.M)
    subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={root}", str(UNITS / "edge-agent.tmpfiles")],
        check=True,
        capture_output=True,
    )
    state = root / "var" / "lib" / "edge-agent"
    assert state.is_dir()
    assert oct(state.stat().st_mode & 0o777) == "0o750"


def test_example_config_is_valid() -> None:
    config = load(UNITS / "agent.toml.example")
    assert config.serving.socket_group == "edge-infer"


def test_runtimes_work_without_writable_executable_memory(
    face_detector_tflite: Path, silero_vad_onnx: Path
) -> None:
    """MemoryDenyWriteExecute=yes in the unit: check both runtimes under the same rule,
    enforced by the kernel's PR_SET_MDWE (Linux 6.3+)."""
    script = textwrap.dedent(
        f"""
        import ctypes, sys
        import numpy as np
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:
            sys.exit(77)
        from pathlib import Path
        from agent.models.runtime import load_session, RuntimeOptions
        face = load_session(Path({str(face_detector_tflite)!r}), None, RuntimeOptions())
        face.run({{"input": np.zeros((1, 128, 128, 3), np.float32)}})
        vad = load_session(Path({str(silero_vad_onnx)!r}), None, RuntimeOptions())
        vad.run({{"input": np.zeros((1, 512), np.float32),
                  "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000)}})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0, result.stderr
