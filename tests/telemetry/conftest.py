"""A real Mosquitto broker on a free loopback port, restartable on the same port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_stub.ports import free_port


class Broker:
    def __init__(self, directory: Path, extra: str = "", persistent: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        # As root, mosquitto would switch to its own user, which cannot read pytest's 0700
        # temporary directories (certificates, ACL, log).
        user = "user root\n" if os.getuid() == 0 else ""
        self.conf.write_text(
            f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            + (
                f"persistence true\npersistence_location {directory}/\n"
                if persistent
                else "persistence false\n"
            )
            + ""
            f"log_dest file {directory / 'mosquitto.log'}\n{extra}"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            pytest.fail("mosquitto is not installed; `make test` installs it")
        self.process = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("mosquitto did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def end_subscriber(process: subprocess.Popen[bytes]) -> None:
    """Stop a mosquitto_sub: SIGTERM, and SIGKILL if it does not go."""
    # Its SIGTERM handler calls mosquitto_disconnect(), which takes libmosquitto's own
    # lock: a signal landing while the loop holds it leaves the process waiting on itself
    # (seen once in CI). What it printed is on disk already.
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class Subscriber:
    """mosquitto_sub in the background, collecting 'topic payload' lines."""

    def __init__(self, broker: Broker, topic: str, out: Path, session: str | None = None) -> None:
        self.out = out
        self.handle = out.open("wb")
        binary = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
        # With a session id the broker queues QoS 1 messages for it while it is away.
        persistent = ["-c", "-i", session] if session else []
        self.process = subprocess.Popen(
            [
                binary,
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-t",
                topic,
                "-v",
                "-q",
                "1",
                *persistent,
            ],
            stdout=self.handle,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)

    def lines(self) -> list[tuple[str, str]]:
        pairs = []
        for line in self.out.read_text().splitlines():
            topic, _, payload = line.partition(" ")
            pairs.append((topic, payload))
        return pairs

    def close(self) -> None:
        end_subscriber(self.process)
        self.handle.close()
