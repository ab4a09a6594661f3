"""The rollout controller's signed ``withdraw`` command on the device (``agent.operations`` →
``agent.models.withdrawal.revert_on_command``), with real models, store and state: the version
it names is left at once when it serves, only ever for a version this device committed before,
and nothing else moves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.errors import NotFoundError
from agent.models.lifecycle import ProbationPolicy
from agent.models.selection import newest_deployable, withdrawn_versions
from agent.operations import Operations, Origin, Withdraw
from tests.models.harness import Harness, committed_first, install

LONG = ProbationPolicy(window_s=60, min_requests=10_000)
WHY = "withdrawn by the rollout controller (signed command)"


class Triggers:
    """The update loop's trigger: how many update cycles the command asked for."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_the_version_in_probation_is_left_at_once_for_the_committed_one(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)
        assert await h.deployer.deploy("scale", 2)
        assert h.stages() == {1: "committed", 2: "active"}
        triggers = Triggers()
        ops = Operations(h.deployer, trigger_update=triggers)
        # Naming a version that does not serve: nothing but a line in the log.
        outcome = await ops.execute(Withdraw("scale", 3), Origin.REMOTE)
        assert outcome.message == (
            "model scale version 3 is not serving (version 2 is); nothing to do"
        )
        assert h.stages() == {1: "committed", 2: "active"} and triggers.count == 0
        outcome = await ops.execute(Withdraw("scale", 2), Origin.REMOTE)
        assert outcome.message == "model scale returned to version 1 from version 2"
        assert outcome.data == {"model": "scale", "withdrawn": 2, "active_version": 1}
        assert h.serving() == 1
        assert h.infer()[0] == 200
        assert h.stages() == {1: "committed", 2: "rolled_back"}
        assert h.reasons("rolled_back", 2) == [f"version 2 {WHY}: rolled back to version 1"]
        assert triggers.count == 1  # an update cycle: the signed metadata confirms it
        # The command is not the source of truth: nothing recorded as withdrawn by it …
        assert withdrawn_versions(h.state, "scale") == frozenset()
        # … and the version it left is quarantined: no update takes it again.
        assert newest_deployable(h.state, "scale", 1) is None
        h.assert_consistent()
        again = await ops.execute(Withdraw("scale", 2), Origin.REMOTE)  # a second copy
        assert again.message.endswith("nothing to do") and h.serving() == 1
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_it_never_goes_to_a_version_the_device_did_not_commit(tmp_path: Path) -> None:
    """v1 committed; v2 in the store, verified but never served (superseded by v3 before it
    was deployed); v3 in probation. The withdrawal of v3 goes back to v1, not to v2; the
    withdrawal of v1 has nowhere to go (nothing older committed): refused, v1 keeps serving."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)
        install(h.store, tmp_path, 3, 4.0)
        assert await h.deployer.deploy("scale", 3)
        assert h.serving() == 3
        triggers = Triggers()
        ops = Operations(h.deployer, trigger_update=triggers)
        outcome = await ops.execute(Withdraw("scale", 3), Origin.REMOTE)
        assert outcome.data["active_version"] == 1
        assert h.serving() == 1
        assert 2 not in h.stages() or h.stage(2) != "committed"
        assert [v for v, kind in h.kinds() if kind == "activated"].count(2) == 0
        with pytest.raises(NotFoundError, match="no earlier version this device committed"):
            await ops.execute(Withdraw("scale", 1), Origin.REMOTE)
        assert h.serving() == 1 and h.stage(1) == "committed"
        assert triggers.count == 2  # the refusal too: the update cycle may bring a version
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_pinned_model_and_a_replaced_version_are_left_alone(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)
        await h.deployer.pin("scale", 2)
        ops = Operations(h.deployer)
        outcome = await ops.execute(Withdraw("scale", 2), Origin.REMOTE)
        assert outcome.message == "model scale is pinned to version 2 by an operator; left as it is"
        assert h.serving() == 2 and h.stage(2) == "committed"
        # The condition is checked under the model's lock: once another version serves, the
        # rollback it asked for does nothing.
        assert await h.deployer.rollback_from("scale", 1, 1, "test") is None
        assert h.serving() == 2
        with pytest.raises(NotFoundError):
            await ops.execute(Withdraw("other", 2), Origin.REMOTE)
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_an_unsigned_version_is_never_a_withdrawal_target(tmp_path: Path) -> None:
    """v1 put in by `edge-agent import` (unsigned) and committed; v2 signed and serving: a
    remote withdrawal never sends the device to an unsigned version."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0, signed=False)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)
        assert await h.deployer.deploy("scale", 2)
        ops = Operations(h.deployer)
        with pytest.raises(NotFoundError):
            await ops.execute(Withdraw("scale", 2), Origin.REMOTE)
        assert h.serving() == 2
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_version_named_before_it_serves_is_held_back_until_the_metadata_is_read_again(
    tmp_path: Path,
) -> None:
    """The race of a halt: an update cycle that read the metadata before it is installing the
    version when the withdraw comes ("not serving"). The daemon's deploy after that cycle
    must not bring it in; after two completed cycles the metadata decides again."""
    from agent.models.holds import Holds
    from agent.models.selection import Deployable
    from agent.parts.deploying import deploy_plan

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)  # verified by a cycle that read the metadata early
        holds, triggers = Holds(), Triggers()
        ops = Operations(h.deployer, trigger_update=triggers, holds=holds)
        outcome = await ops.execute(Withdraw("scale", 2), Origin.REMOTE)
        assert outcome.message.endswith(
            "nothing to do; not deployed before an update cycle reads the signed metadata again"
        )
        assert holds.held("scale") == {2} and triggers.count == 1
        plan = {"scale": Deployable(2, frozenset())}  # what the early cycle told
        await deploy_plan(h.deployer, plan, holds.held)
        assert h.serving() == 1  # held back
        holds.cycle_done()
        await deploy_plan(h.deployer, plan, holds.held)
        assert h.serving() == 1  # the cycle that completed first may have started before
        holds.cycle_done()
        assert holds.held("scale") == frozenset()
        await deploy_plan(h.deployer, plan, holds.held)  # the metadata read since decides
        assert h.serving() == 2
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_the_holds_survive_a_restart_bounded_and_checked(tmp_path: Path) -> None:
    """A restart between the withdraw and the second cycle keeps the version out: the holds
    are in the state database (one settings row, written on the I/O thread, in order). What a
    previous run left is read back checked and bounded."""
    from agent.iothread import IoThread
    from agent.models import holds as withdrawal_holds
    from agent.state import StateDB

    async def run(steps: list[str]) -> tuple[frozenset[int], frozenset[int]]:
        """A run of the agent: attach, then ``hold:V`` / ``cycle`` steps; what is held."""
        io, state = IoThread(), StateDB(tmp_path / "state.db")
        holds = withdrawal_holds.Holds()
        try:
            await holds.attach(state, io)
            for step in steps:
                if step == "cycle":
                    holds.cycle_done()
                else:
                    holds.hold("scale", int(step.split(":")[1]))
            await io.run(lambda: None)  # the writes queued before it are done
            return holds.held("scale"), holds.held("other")
        finally:
            await io.aclose()
            state.close()

    assert asyncio.run(run(["hold:2", "hold:3"])) == ({2, 3}, frozenset())
    assert asyncio.run(run(["cycle"])) == ({2, 3}, frozenset())  # restored: one cycle left
    assert asyncio.run(run([])) == ({2, 3}, frozenset())  # a restart alone changes nothing
    assert asyncio.run(run(["cycle"])) == (frozenset(), frozenset())  # the second cycle
    assert asyncio.run(run([])) == (frozenset(), frozenset())
    state = StateDB(tmp_path / "state.db")
    assert state.setting(withdrawal_holds.HOLDS_KEY) is None  # nothing left behind
    # Malformed rows, and rows past the bound, are dropped; the good ones kept.
    rows: list[object] = [["scale", 4, 1], ["scale", -1, 1], ["scale", 5, 99], "x", ["", 6, 1]]
    rows += [["other", v, 2] for v in range(1, withdrawal_holds.MAX_HOLDS + 10)]
    state.set_setting(withdrawal_holds.HOLDS_KEY, rows)
    state.close()
    held, other = asyncio.run(run([]))
    assert held == {4}
    assert len(other) == withdrawal_holds.MAX_HOLDS - 5  # the first MAX_HOLDS rows, 4 bad
    state = StateDB(tmp_path / "state.db")
    state.set_setting(withdrawal_holds.HOLDS_KEY, {"not": "a list"})
    state.close()
    assert asyncio.run(run([])) == (frozenset(), frozenset())


def test_a_held_version_is_not_validated_at_a_restart(tmp_path: Path) -> None:
    """The agent restarts with version 2 verified in the store and held (a withdraw named it
    while its update child installed it): start-up serves the committed version 1 and leaves
    2 alone. Without the hold, the same start-up validates and serves 2."""

    async def first_run() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)  # verified by a cycle, never deployed
        await h.deployer.close()
        h.close()

    async def restart(held: frozenset[int]) -> tuple[int | None, dict[int, str]]:
        h = Harness(tmp_path)
        await h.deployer.start(lambda name: held if name == "scale" else frozenset())
        serving, stages = h.serving(), h.stages()
        await h.deployer.close()
        h.close()
        return serving, stages

    asyncio.run(first_run())
    serving, stages = asyncio.run(restart(frozenset({2})))
    assert serving == 1 and stages[2] == "verified"
    serving, _ = asyncio.run(restart(frozenset()))
    assert serving == 2  # the metadata did not withdraw it: it goes on as before
