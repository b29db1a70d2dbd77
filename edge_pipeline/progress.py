"""The one progress channel: library code reports tasks here; the CLI decides how to show them.

Library code never prints. It calls ``with progress.task("training", total=n) as t: t.advance()`` and
``progress.note("...")``; by default nothing is shown. The CLI installs a rich sink with :func:`use_sink`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class Sink(Protocol):
    def start(self, description: str, total: float | None) -> object: ...
    def advance(self, handle: object, amount: float, description: str | None) -> None: ...
    def stop(self, handle: object) -> None: ...
    def note(self, message: str) -> None: ...


class _Silent:
    def start(self, description, total):
        return None

    def advance(self, handle, amount, description):
        pass

    def stop(self, handle):
        pass

    def note(self, message):
        pass


_sink: ContextVar[Sink] = ContextVar("edge_pipeline_progress", default=_Silent())  # noqa: B039 (stateless)


class Task:
    def __init__(self, sink: Sink, handle: object):
        self._sink, self._handle = sink, handle

    def advance(self, amount: float = 1, description: str | None = None) -> None:
        self._sink.advance(self._handle, amount, description)


@contextmanager
def task(description: str, total: float | None = None) -> Iterator[Task]:
    sink = _sink.get()
    handle = sink.start(description, total)
    try:
        yield Task(sink, handle)
    finally:
        sink.stop(handle)


def note(message: str) -> None:
    _sink.get().note(message)


@contextmanager
def use_sink(sink: Sink) -> Iterator[None]:
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
