"""``@record``: the agent's immutable records, frozen for the type checker, plain at run time.

``@dataclass(frozen=True, slots=True)`` enforces immutability when the program runs, at a price
paid for every class and every instance: frozen dataclasses get a generated ``__setattr__``,
``__delattr__`` and ``__hash__`` each, and an ``__init__`` that sets every field through
``object.__setattr__``. Measured on CPython 3.11 (a five-field class): 15.4 kB of memory per
class against 9.6 kB, and 431 against 113 ns to build an instance of four fields. The daemon
loads about forty of these classes before it serves (bench/footprint.py, BENCHMARKS.md).

``record`` builds the same dataclass (slots, field-wise ``__eq__`` and ``__hash__``) without
the run-time guard, and tells type checkers it is frozen (PEP 681's ``frozen_default``): an
assignment to a field is a mypy error, and mypy runs in strict mode on ``agent/`` in the test
command, so the guarantee moves from run time to the check before merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[T]) -> type[T]:
    """``cls`` as a dataclass with slots, equality and a hash by its fields."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
