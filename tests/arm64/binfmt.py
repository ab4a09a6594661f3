"""qemu-user for aarch64 registered with the kernel's binfmt_misc while arm64 code runs here.

Registered from Debian's ``/usr/lib/binfmt.d/qemu-aarch64.conf`` (qemu-user-static), whose
flags include ``F``: the kernel opens the interpreter at registration, so it works inside a
chroot that holds no qemu. The registration is global to the machine, so users are counted
(one file per holder under ``/run/edge-agent-tests/binfmt``, pruned when their process is
gone) and the last one out undoes what the first one in did: nothing that was there before.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BINFMT = Path("/proc/sys/fs/binfmt_misc")
ENTRY = BINFMT / "qemu-aarch64"
CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
STATE = Path("/run/edge-agent-tests/binfmt")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holders(users: Path) -> list[Path]:
    """Holders whose process still runs; the files of dead ones are removed."""
    alive = []
    for holder in users.iterdir():
        if _alive(int(holder.name.split("-", 1)[0])):
            alive.append(holder)
        else:
            holder.unlink(missing_ok=True)
    return alive


def _flags() -> str:
    for line in ENTRY.read_text().splitlines():
        if line.startswith("flags:"):
            return line.partition(":")[2].strip()
    return ""


def _register(done: dict[str, bool]) -> None:
    """Mount binfmt_misc and register aarch64 where missing; ``done`` records what was done."""
    assert CONF.is_file(), f"{CONF} missing: qemu-user-static is not installed (make system-deps)"
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
        done["mounted"] = True
    if not ENTRY.exists():
        (BINFMT / "register").write_text(CONF.read_text().strip())
        done["registered"] = True
    assert "F" in _flags(), (
        f"{ENTRY} is registered without the F (fix-binary) flag: a chroot cannot find qemu"
    )


def _undo(done: dict[str, bool]) -> None:
    if done.get("registered") and ENTRY.exists():
        ENTRY.write_text("-1")
    if done.get("mounted") and (BINFMT / "register").exists():
        subprocess.run(["umount", str(BINFMT)], check=False)


@contextmanager
def aarch64() -> Iterator[None]:
    """aarch64 ELF programs run (under qemu-aarch64-static) until the block ends."""
    assert os.geteuid() == 0, "registering binfmt_misc needs root"
    users = STATE / "users"
    users.mkdir(parents=True, exist_ok=True)
    marker = STATE / "done.json"  # what the holders' registration did, to be undone
    me = users / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with (STATE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # A marker without holders was left by a killed run: its undo is still owed.
        done = json.loads(marker.read_text()) if marker.exists() else {}
        others = _holders(users)
        try:
            _register(done)
        except BaseException:
            if not others:
                _undo(done)
                marker.unlink(missing_ok=True)
            raise
        marker.write_text(json.dumps(done))
        me.touch()
    try:
        yield
    finally:
        with (STATE / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            me.unlink(missing_ok=True)
            if not _holders(users):
                _undo(json.loads(marker.read_text()) if marker.exists() else {})
                marker.unlink(missing_ok=True)
