"""The update child imports the installed agent, whatever the working directory holds.

The child parses network input; it used to start as ``python -m agent``, which puts the
working directory first on ``sys.path``, so an ``agent/`` package there ran in its place.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenarios.device import Device, running_repository_device

EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    with running_repository_device(tmp_path, "isolated-1", k=8, n=4) as dev:
        yield dev


def test_an_agent_package_in_the_working_directory_is_not_imported(
    device: Device, tmp_path: Path
) -> None:
    cwd = tmp_path / "cwd"
    marker = tmp_path / "shadow-ran"
    (cwd / "agent").mkdir(parents=True)
    (cwd / "agent" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported from the working directory')\n"
    )
    (cwd / "agent" / "__main__.py").write_text("raise SystemExit(0)\n")
    device.publish(1)
    device.log = (device.root / "agent.log").open("ab")
    # The console script, as systemd starts it: its own sys.path does not hold the cwd.
    device.process = subprocess.Popen(
        [EDGE_AGENT, "run", "--config", str(device.config)],
        cwd=cwd,
        stdout=device.log,
        stderr=device.log,
    )
    assert device.wait_serving() == 1, device.log_tail()  # the update child ran, and worked
    assert not marker.exists(), device.log_tail()
