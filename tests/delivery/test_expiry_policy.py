"""The repository's expiry policy, checked from outside: `edge-cloud` run as a command, the
served metadata read as a device reads it. The periods set at init (or changed later) hold for
every later signing, refresh and publish alike."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from cloud_stub.samples import matmul_model

EDGE_CLOUD = str(Path(sys.executable).with_name("edge-cloud"))


def edge_cloud(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [EDGE_CLOUD, *args], capture_output=True, text=True, check=False, timeout=300
    )
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def served(repo: Path, role: str) -> dict[str, object]:
    """The newest signed metadata of ``role`` that the repository serves."""
    metadata = repo / "public" / "metadata"
    if role == "timestamp":
        path = metadata / "timestamp.json"
    else:
        path = max(metadata.glob(f"*.{role}.json"), key=lambda p: int(p.name.split(".")[0]))
    signed: dict[str, object] = json.loads(path.read_text())["signed"]
    return signed


def lifetime_days(repo: Path, role: str, signed_after: dt.datetime) -> float:
    """How long ``role``'s metadata, signed after ``signed_after``, stays valid."""
    expires = dt.datetime.fromisoformat(str(served(repo, role)["expires"]).replace("Z", "+00:00"))
    return (expires - signed_after).total_seconds() / 86400


def assert_lifetime(repo: Path, role: str, days: float, before: dt.datetime) -> None:
    """Signed between ``before`` and now with a lifetime of ``days`` (whole seconds)."""
    after = dt.datetime.now(dt.UTC)
    longest = lifetime_days(repo, role, before.replace(microsecond=0))
    shortest = lifetime_days(repo, role, after)
    assert shortest <= days <= longest + 1 / 86400, (role, shortest, longest, days)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_refresh_and_publish_keep_the_policy_set_at_init(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    before = now()
    policy = ("--timestamp-days", "0.25", "--snapshot-days", "2", "--targets-days", "30")
    edge_cloud("init", str(repo), *policy)
    assert_lifetime(repo, "timestamp", 0.25, before)

    before = now()
    out = edge_cloud("refresh", str(repo)).stdout
    assert served(repo, "timestamp")["version"] == 2  # really signed again
    assert_lifetime(repo, "timestamp", 0.25, before)
    assert_lifetime(repo, "snapshot", 2, before)
    assert "timestamp expires" in out

    model = matmul_model(tmp_path / "mm.onnx", k=8, n=4)
    before = now()
    edge_cloud("publish", str(repo), str(model), "--name", "mm", "--version", "1")
    assert served(repo, "timestamp")["version"] == 3
    assert_lifetime(repo, "timestamp", 0.25, before)
    assert_lifetime(repo, "snapshot", 2, before)
    assert_lifetime(repo, "targets", 30, before)
    # The policy is the publisher's, kept beside the keys: nothing of it is served.
    assert json.loads((repo / "expiry.json").read_text())["timestamp_days"] == 0.25
    assert not any(p.name == "expiry.json" for p in (repo / "public").rglob("*"))


def test_refresh_and_publish_change_the_policy_for_later_signings(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    edge_cloud("init", str(repo))
    before = now()
    out = edge_cloud("refresh", str(repo), "--timestamp-days", "0.5").stdout
    assert "timestamp 0.5 d" in out
    assert_lifetime(repo, "timestamp", 0.5, before)
    assert_lifetime(repo, "snapshot", 7, before)  # the others keep their periods

    before = now()
    edge_cloud("refresh", str(repo))  # no flag: the changed policy holds
    assert_lifetime(repo, "timestamp", 0.5, before)

    model = matmul_model(tmp_path / "mm.onnx", k=8, n=4)
    before = now()
    edge_cloud(
        "publish", str(repo), str(model), "--name", "mm", "--version", "1", "--snapshot-days", "3"
    )
    assert_lifetime(repo, "timestamp", 0.5, before)
    assert_lifetime(repo, "snapshot", 3, before)
    before = now()
    edge_cloud("refresh", str(repo))
    assert_lifetime(repo, "snapshot", 3, before)


def test_a_repository_without_a_policy_file_signs_with_the_defaults(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    edge_cloud("init", str(repo), "--timestamp-days", "0.25")
    (repo / "expiry.json").unlink()  # as made by an agent version before the policy file
    before = now()
    edge_cloud("refresh", str(repo))
    assert_lifetime(repo, "timestamp", 1, before)
    assert_lifetime(repo, "snapshot", 7, before)


def test_bad_periods_are_refused_and_nothing_is_signed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    edge_cloud("init", str(repo), "--timestamp-days", "0.25")
    for bad in ("0", "-1", "nan", "a day"):
        result = edge_cloud("refresh", str(repo), "--timestamp-days", bad, ok=False)
        assert result.returncode == 2
        assert "--timestamp-days: expected a positive number of days" in result.stderr
    result = edge_cloud("init", str(tmp_path / "other"), "--snapshot-days", "-2", ok=False)
    assert "--snapshot-days: expected a positive number of days, found '-2'" in result.stderr
    assert not (tmp_path / "other").exists()

    policy = repo / "expiry.json"
    policy.write_text(json.dumps({"timestamp_days": -1, "snapshot_days": 7}))
    result = edge_cloud("refresh", str(repo), ok=False)
    assert result.returncode == 2
    assert f"{policy}: timestamp_days: expected a positive number of days, found -1" in (
        result.stderr
    )
    policy.write_text(json.dumps({"timestamps_days": 1}))
    result = edge_cloud("refresh", str(repo), ok=False)
    assert "unknown key 'timestamps_days'" in result.stderr
    policy.write_text("{")
    result = edge_cloud("refresh", str(repo), ok=False)
    assert "cannot read the expiry policy" in result.stderr
    assert served(repo, "timestamp")["version"] == 1  # every refusal left the metadata as it was
