"""What the running parts of this process say about themselves, for ``/readyz``.

A part that runs in threads (capture, delivery) registers a *probe* while it runs: a
function that returns its problems in words ("logical capture is not connected"), or
nothing when all is well. Capture also notes its *progress* here (each batch the change
log took), cheaply, from its hot path, so that a probe can tell working from stuck.

The registry is per process, like the threads it describes; ``ops.readiness`` asks every
probe. This module imports nothing of pgherald, so that any layer may report to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

Probe = Callable[["psycopg.Connection[Any] | None"], list[str]]
"""Returns the part's problems (empty: ready). It gets a connection to the change log's
database for the figures it needs (None when the database cannot be reached), and must
be quick: it runs for every readiness request."""

_lock = threading.Lock()
_probes: dict[int, tuple[str, Probe]] = {}
_progress: dict[str, float] = {}


def register(owner: object, name: str, probe: Probe) -> None:
    """Adds ``owner``'s probe (``name`` says whose it is in reports)."""
    with _lock:
        _probes[id(owner)] = (name, probe)


def unregister(owner: object) -> None:
    with _lock:
        _probes.pop(id(owner), None)


def probes() -> list[tuple[str, Probe]]:
    with _lock:
        return list(_probes.values())


def note_progress(name: str, now: float | None = None) -> None:
    """Records that ``name`` (a source's checkpoint name) moved forward just now.

    Called for every batch, so it does no more than a dict assignment (atomic under the
    GIL, no lock needed)."""
    _progress[name] = time.monotonic() if now is None else now


def last_progress(name: str) -> float | None:
    """When ``name`` last moved forward (``time.monotonic()``), None if never here."""
    return _progress.get(name)


__all__ = ["Probe", "last_progress", "note_progress", "probes", "register", "unregister"]
