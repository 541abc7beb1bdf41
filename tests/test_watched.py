"""A watched call (``ingest.sink.Watched``: database and server work run in a thread a run may
abandon) survives Python's import deadlock check: a run abandoned a store lookup while it imported
MLflow's modules on a busy machine, and the retry's thread died of ``_DeadlockError``, ending the run
as "unexpected" (seen in CI in test_fleet and test_concurrent_writers)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator

import pytest

from ingest.sink import Watched, answered_in_time, import_deadlock


class _Cycle(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A package whose body imports its submodule, and whose making waits until another thread has
    begun importing that submodule: the other thread holds the submodule's lock and waits for the
    package's; the package's body then asks for the submodule's lock and closes the cycle, so
    Python's check raises in the thread importing the package (as MLflow's store modules met it)."""

    def __init__(self, package: str) -> None:
        self.package, self.child = package, f"{package}.child"
        self.making, self.other_began = threading.Event(), threading.Event()

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name in (self.package, self.child):
            return importlib.util.spec_from_loader(name, self, is_package=name == self.package)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        if spec.name == self.package and not self.making.is_set():
            self.making.set()
            self.other_began.wait(10)
            time.sleep(0.3)

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == self.package:
            importlib.import_module(self.child)


@pytest.fixture
def cycle() -> Iterator[_Cycle]:
    finder = _Cycle(f"deadlock_{uuid.uuid4().hex[:8]}")
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.startswith(finder.package)]:
            del sys.modules[name]


def _import_both(cycle: _Cycle, call: Callable[[Callable[[], types.ModuleType]], object]) -> tuple[object, list[BaseException]]:
    """The package imported by ``call`` while another thread imports its submodule; what ``call``
    gave, and what the other thread raised."""
    other_failed: list[BaseException] = []

    def other() -> None:
        cycle.making.wait(10)
        cycle.other_began.set()
        try:
            importlib.import_module(cycle.child)
        except BaseException as e:
            other_failed.append(e)

    t = threading.Thread(target=other)
    t.start()
    try:
        return call(lambda: importlib.import_module(cycle.package)), other_failed
    finally:
        t.join(20)


def test_the_cycle_is_a_real_import_deadlock_without_the_watch(cycle: _Cycle) -> None:
    """The fixture's teeth: imported plainly, the second import dies of the check."""
    with pytest.raises(RuntimeError) as raised:
        _import_both(cycle, lambda imp: imp())
    assert import_deadlock(raised.value), repr(raised.value)


def test_a_watched_call_that_meets_an_import_deadlock_is_run_again_and_answers(cycle: _Cycle) -> None:
    def watched(imp: Callable[[], types.ModuleType]) -> object:
        w = Watched(imp, "test-watched")
        assert w.done.wait(30)
        return w.result()

    module, other_failed = _import_both(cycle, watched)
    assert module.__name__ == cycle.package and not other_failed  # type: ignore[attr-defined]


def test_a_run_waiting_on_a_watched_store_read_that_meets_an_import_deadlock_gets_the_answer(cycle: _Cycle) -> None:
    module, _ = _import_both(cycle, lambda imp: answered_in_time(imp, "open the MLflow store", "postgresql://db", 10.0))
    assert module.__name__ == cycle.package  # type: ignore[attr-defined]


def test_an_import_deadlock_under_the_stores_own_error_is_run_again_too(cycle: _Cycle) -> None:
    """MLflow and SQLAlchemy raise their own errors from a failed import (``raise … from e``)."""

    def wrapped(imp: Callable[[], types.ModuleType]) -> object:
        def call() -> types.ModuleType:
            try:
                return imp()
            except RuntimeError as e:
                raise ValueError("the store failed") from e

        return answered_in_time(call, "open the MLflow store", "postgresql://db", 10.0)

    module, _ = _import_both(cycle, wrapped)
    assert module.__name__ == cycle.package  # type: ignore[attr-defined]


def test_any_other_runtime_error_is_answered_at_once() -> None:
    calls: list[int] = []

    def fails() -> None:
        calls.append(1)
        raise RuntimeError("not an import")

    with pytest.raises(RuntimeError, match="not an import"):
        answered_in_time(fails, "open the MLflow store", "postgresql://db", 10.0)
    assert calls == [1], "run once"
