"""The seams the agent's watching parts share: the stoppable thread they run on, the callback
they hand findings to, and the sink a watch backend reports file system events into.

Every long-running part (the realtime guard, the rescanner, the package watch) is a
``Worker``: ``start()`` runs it on its own thread, ``stop(timeout_s)`` sets its
``threading.Event`` and joins, and may be called any number of times. Findings leave through
``emit(source, findings)``, findings being wire dicts (``Finding.to_wire()`` and the shapes
of ``docs/protocol.md``), ``source`` one of ``SOURCES``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final, Protocol

import structlog

SOURCES: Final = ("realtime", "rescan", "packages", "integrity")

Emit = Callable[[str, list[dict[str, Any]]], None]
"""``emit(source, findings)``: hand findings to the reporter. Must not block for long."""

log = structlog.get_logger(__name__)


def integrity_finding(reason: str, detail: str, *, severity: str = "warning") -> dict[str, Any]:
    """An integrity finding: the agent could not see everything it should have."""
    return {"type": "integrity", "reason": reason, "severity": severity, "detail": detail}


class Sink(Protocol):
    """Where a watch backend reports what it saw; paths are paths on this machine."""

    def changed(self, full_path: str, *, tree: bool, process: dict[str, Any] | None) -> None:
        """Something at ``full_path`` changed; ``tree``: a directory appeared or went, so
        everything below it must be looked at too."""
        ...

    def overflow(self, backend: str) -> None:
        """The kernel dropped events: what changed meanwhile is unknown."""
        ...

    def unwatched(self, backend: str, reason: str, detail: str) -> None:
        """A part of the tree could not be watched; ``reason`` is ``watch_limit`` (the
        kernel's limit on watches), ``watch_failed`` (any other error) or ``backend_failed``
        (the backend's thread has ended: nothing is watched any more)."""
        ...


class Worker:
    """A thread that runs ``run()`` until ``stopping`` is set.

    Subclasses implement ``run`` (loop while ``not self.stopping.is_set()``, waiting on the
    event rather than sleeping) and may override ``prepare`` (runs in ``start``, in the
    caller's thread, so a set-up error reaches the caller), ``wake`` (interrupt a blocking
    wait when stopping) and ``cleanup`` (runs once, after the thread has ended). A ``run``
    that raises is logged and reported through ``emit`` as an integrity finding, never lost.
    """

    name = "worker"

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._cleaned = False

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"{self.name} was already started")
            self.prepare()
            self._thread = threading.Thread(
                target=self._main, name=f"driftwarden-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop and wait up to ``timeout_s``; True when the thread has ended. Idempotent."""
        self.stopping.set()
        self.wake()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        ended = thread is None or not thread.is_alive()
        if ended:
            with self._lock:
                cleaned, self._cleaned = self._cleaned, True
            if not cleaned:
                self.cleanup()
        else:
            log.error("worker_stop_timeout", worker=self.name, timeout_s=timeout_s)
        return ended

    @property
    def native_id(self) -> int | None:
        """The kernel's id of the thread (for priorities, ``/proc/self/task/ID``)."""
        thread = self._thread
        return thread.native_id if thread is not None else None

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _main(self) -> None:
        try:
            self.run()
        except Exception as exc:  # a worker must never vanish silently
            log.exception("worker_failed", worker=self.name)
            self.emit(
                "integrity",
                [integrity_finding(f"{self.name}_failed", f"{type(exc).__name__}: {exc}")],
            )

    def prepare(self) -> None:
        return

    def run(self) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        return

    def cleanup(self) -> None:
        return
