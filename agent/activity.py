"""What the agent is doing now, as a record: the status board shows it (STATUS=, /status)."""

from __future__ import annotations

from agent.records import record

# The line shown for each kind of activity (systemd's STATUS=, the status document).
TEXTS = {
    "idle": "idle",
    "updating": "{detail}",  # the update loop's own words: "checking for updates"
    "downloading": "downloading a new version ({mib:.1f} MB so far)",
    # What the update child tells (``agent.delivery.pipe.Progress``): the version and its size.
    "downloading version": (
        "downloading {model} version {version} ({mib:.1f} of {total_mib:.1f} MB)"
    ),
    "validating": "validating {model} version {version}",
    "validating drained": "validating {model} version {version} (drained)",
    "draining": "draining {model} version {version}: {detail}",
    "probation": "{model} version {version} in probation",
    "probation failed": "{model} version {version} failed its probation; kept serving",
    "rolled back to": "rolled back {model} to version {version}",
    "rolled back, none left": "rolled back {model} version {version}; nothing to serve",
    "rolled back, previous failed": (
        "rolled back {model} version {version}; version {detail} failed"
    ),
    "switching": "switching {model} to version {version}: {detail}",
}


@record
class Activity:
    """One thing under way: its kind (a key of ``TEXTS``), the model and version it concerns,
    a detail (a reason, another version), the bytes of a download."""

    what: str
    model: str | None = None
    version: int | None = None
    detail: str = ""
    bytes_done: int | None = None
    bytes_total: int | None = None  # None: not known (the update child does not say)

    @property
    def idle(self) -> bool:
        return self.what == "idle"

    @property
    def text(self) -> str:
        return TEXTS[self.what].format(
            model=self.model,
            version=self.version,
            detail=self.detail,
            mib=(self.bytes_done or 0) / 2**20,
            total_mib=(self.bytes_total or 0) / 2**20,
        )


IDLE = Activity("idle")
