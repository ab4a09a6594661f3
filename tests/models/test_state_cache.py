"""The state database's page caches: a few pages each, and every row still goes through."""

from __future__ import annotations

import _sqlite3
import ctypes
from pathlib import Path

import pytest

from agent import state as state_module
from agent.state import CACHE_PAGES, StateDB


def _sqlite_memory() -> int:
    """SQLite's own count of the bytes it holds (every connection of this process)."""
    library = ctypes.CDLL(_sqlite3.__file__)
    library.sqlite3_memory_used.restype = ctypes.c_int64
    return int(library.sqlite3_memory_used())


def test_both_connections_cache_a_few_pages_and_rows_beyond_them_go_through(
    tmp_path: Path,
) -> None:
    state = StateDB(tmp_path / "state.db")
    try:
        for db in (state._db, state._reader):
            assert db.execute("PRAGMA cache_size").fetchone()[0] == CACHE_PAGES
        reason = "r" * 200  # 300 events: about 20 pages, more than a cache holds
        with state.batch():  # one transaction whose pages outgrow the writer's cache
            for version in range(1, 301):
                state.record("m", version, "verified", f"{reason} {version}", event="verified")
        events = state.events(limit=1000)  # read back through the reader's
        assert [e.version for e in events] == list(range(1, 301))
        assert events[-1].reason == f"{reason} 300"
        assert [d.version for d in state.deployments("m")] == list(range(1, 301))
    finally:
        state.close()


def test_the_small_caches_hold_less_sqlite_memory_than_the_default_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both connections after a write and reads: SQLite's default caches set aside 20 pages
    each at their first read (about 86 kB); the small ones give most of that back."""

    def held(path: Path) -> int:
        before = _sqlite_memory()
        state = StateDB(path)
        try:
            state.record("m", 1, "verified", "imported", event="verified")
            assert state.get("m", 1) is not None and len(state.events()) == 1
            return _sqlite_memory() - before
        finally:
            state.close()

    small = held(tmp_path / "small.db")
    with monkeypatch.context() as patch:
        patch.setattr(state_module, "_small_cache", lambda db: None)
        default = held(tmp_path / "default.db")
    assert small < default - 64 * 1024, (small, default)
