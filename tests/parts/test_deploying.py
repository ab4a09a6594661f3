"""After an update cycle the daemon deploys what the child told in its summary, not what a
re-read of state.db says (issue 11); a cycle without a valid summary is an error event and
deploys nothing. Real deployer, store, state database and ONNX models (tests/models/harness)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.delivery.cycle import record_withdrawn
from agent.delivery.report import CycleReport, ModelOutcome
from agent.models.lifecycle import ProbationPolicy, Stage
from agent.models.selection import Deployable
from agent.parts import deploying
from tests.models.harness import Harness, committed_first, install

LONG = ProbationPolicy(window_s=60, min_requests=10_000)


def told(**models: ModelOutcome) -> CycleReport:
    report = CycleReport(finished=1.0)
    report.models = dict(models)
    return report


def test_the_plan_is_what_the_summary_says() -> None:
    report = told(scale=ModelOutcome((3,), 3, (1, 2), ""), other=ModelOutcome())
    assert deploying.told_plan(report) == {
        "scale": Deployable(3, frozenset({1, 2})),
        "other": Deployable(None, frozenset()),
    }
    assert deploying.told_plan(CycleReport.untold("no summary")) is None
    assert Deployable(3).newer_than(None) == 3
    assert Deployable(3).newer_than(2) == 3
    assert Deployable(3).newer_than(3) is None
    assert Deployable(None).newer_than(1) is None


def test_the_daemon_deploys_what_it_is_told_not_what_the_record_says(tmp_path: Path) -> None:
    """state.db holds v2 and v3 verified; a summary that names no deployable version deploys
    nothing, one that names v2 deploys v2 (not the record's newest, v3)."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        for version, factor in ((2, 3.0), (3, 4.0)):
            install(h.store, tmp_path, version, factor)
            h.state.record("scale", version, Stage.VERIFIED.value, "installed")
        await deploying.after_cycle(h.deployer, told(scale=ModelOutcome()))
        assert h.serving() == 1
        await deploying.after_cycle(h.deployer, told(scale=ModelOutcome((2,), 2, (), "")))
        assert h.serving() == 2
        assert h.stages() == {1: "committed", 2: "active", 3: "verified"}
        # Told an older version than the one serving: never a step back.
        await deploying.after_cycle(h.deployer, told(scale=ModelOutcome((), 1, (), "")))
        assert h.serving() == 2
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_cycle_without_a_summary_is_an_error_event_and_deploys_nothing(tmp_path: Path) -> None:
    """The child died: the record says v2 is verified, but nothing is deployed (the record may
    lack what the dead child had not yet recorded); a ``failed`` event is recorded and passed
    on like any (the reporter forwards it), and the model keeps serving."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)
        h.state.record("scale", 2, Stage.VERIFIED.value, "installed")
        error = "update child exited with -9 and no valid summary"
        await deploying.after_cycle(h.deployer, CycleReport.untold(error))
        assert h.serving() == 1
        assert h.infer()[0] == 200
        assert h.stage(2) == "verified"
        reason = f"update child: {error}"
        assert [(e.name, e.version, e.kind, e.reason) for e in h.events[-1:]] == [
            ("*", None, "failed", reason)
        ]
        recorded = h.state.events("*", limit=5)
        assert [(e.kind, e.reason) for e in recorded] == [("failed", reason)]
        # A failed cycle whose child did tell its outcomes is acted on.
        report = told(scale=ModelOutcome((), 2, (), ""))
        report.error = "repository metadata rejected"
        await deploying.after_cycle(h.deployer, report)
        assert h.serving() == 2
        assert len(h.state.events("*", limit=5)) == 1  # no second error event
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_pin_holds_and_a_told_withdrawal_returns(tmp_path: Path) -> None:
    """A model pinned to v1 is not moved by a summary naming v2; unpinned, v2 is deployed;
    a summary that says v2 is withdrawn returns the device to v1."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        await h.deployer.pin("scale", 1)
        install(h.store, tmp_path, 2, 3.0)
        h.state.record("scale", 2, Stage.VERIFIED.value, "installed")
        await deploying.after_cycle(h.deployer, told(scale=ModelOutcome((2,), 2, (), "")))
        assert h.serving() == 1
        await h.deployer.pin("scale", None)
        await deploying.after_cycle(h.deployer, told(scale=ModelOutcome((2,), 2, (), "")))
        assert h.serving() == 2
        record_withdrawn(h.state, "scale", [2])  # as the child records it before telling
        await deploying.after_cycle(h.deployer, told(scale=ModelOutcome((), None, (2,), "")))
        assert h.serving() == 1
        assert h.stage(2) == "rolled_back"
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_without_a_child_the_record_is_read_on_the_io_thread(tmp_path: Path) -> None:
    """A reload after `edge-agent import`: nothing told, so the plan comes from state.db,
    read in one job on the I/O thread (the store's models included)."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)
        h.state.record("scale", 2, Stage.VERIFIED.value, "imported")
        seen: list[bool] = []
        real = h.deployer.state.deployments

        def deployments(name: str | None = None) -> list[object]:
            seen.append(h.io.on_worker())
            return real(name)  # type: ignore[return-value]

        h.deployer.state.deployments = deployments  # type: ignore[method-assign]
        plan = await deploying.read_plan(h.deployer, [])
        h.deployer.state.deployments = real  # type: ignore[method-assign]
        assert plan == {"scale": Deployable(2, frozenset())}
        assert seen == [True]
        await deploying.deploy_plan(h.deployer, plan)
        assert h.serving() == 2
        await h.deployer.close()
        h.close()

    asyncio.run(main())
