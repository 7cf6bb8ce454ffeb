"""Applying retentions: one prune pass over the store, and the daemon's periodic job.

Each watch keeps its events for its own ``retain`` (``pgherald watch set NAME --retain
90d``, or ``retain`` in its ``[[watch]]``), else for the configuration's ``retain``, else
forever. Events of removed watches, and the runs and errors of no watch, follow the
configuration's ``retain``. The work itself, and what is kept whatever its age, is
``store.retention``'s. One pass runs at a time per store (an advisory lock), whether it
was started by ``pgherald prune`` or by the job in ``pgherald run``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.errors import ConnectionFailed, PgHeraldError, WatchError
from pgherald.retain import Retention, effective, parse_interval
from pgherald.store import migrations
from pgherald.store import retention as store
from pgherald.store import watches as registry
from pgherald.store.retention import PruneCounts

log = logging.getLogger("pgherald.prune")


class PruneBusy(PgHeraldError):
    """Another prune of the same store is running."""


@dataclass(frozen=True)
class WatchPrune:
    """What one pass did for one watch (a removed one too: ``registered`` is false)."""

    watch: str
    registered: bool
    retention: Retention
    cutoff: datetime | None
    counts: PruneCounts


@dataclass
class PruneReport:
    """One pass: per watch, plus the runs and errors of no watch (``sources``)."""

    dry_run: bool
    now: datetime
    watches: list[WatchPrune] = field(default_factory=list)
    sources: PruneCounts | None = None
    sources_cutoff: datetime | None = None

    @property
    def total(self) -> PruneCounts:
        total = PruneCounts()
        for w in self.watches:
            total.add(w.counts)
        if self.sources is not None:
            total.add(self.sources)
        return total


def _cutoff(now: datetime, retention: Retention) -> datetime | None:
    return None if retention.period is None else now - retention.period


def prune(
    settings: Settings,
    *,
    watch: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> PruneReport:
    """One pass: prunes every watch (or only ``watch``) by its retention.

    ``now`` is the database's clock unless given (tests move it). ``dry_run`` counts what
    would go, changing nothing. ``PruneBusy`` if another pass holds the store's prune
    lock; ``WatchError`` for a ``watch`` that is neither registered nor in the log.
    """
    schema = settings.schema
    with connect(settings, application_name="pgherald-prune") as conn:
        migrations.require_current(conn, schema)
        conn.commit()
        if not store.try_lock(conn, schema):
            raise PruneBusy(
                "another prune of this store is running (`pgherald run` prunes periodically):"
                " try again when it is done"
            )
        try:
            return _pass(conn, settings, watch, dry_run, now, stop)
        finally:
            if not conn.closed:
                conn.rollback()
                store.unlock(conn, schema)


def _pass(
    conn: psycopg.Connection[Any],
    settings: Settings,
    only: str | None,
    dry_run: bool,
    now: datetime | None,
    stop: threading.Event | None,
) -> PruneReport:
    schema = settings.schema
    registered = {w.name: w for w in registry.list_watches(conn, schema)}
    conn.commit()
    logged = store.logged_watches(conn, schema)
    if only is not None:
        if only not in registered and only not in logged:
            raise WatchError(f"there is no watch named {only!r}: `pgherald watch list` shows them")
        names = [only]
    else:
        names = sorted(set(registered) | set(logged))
    clock = now if now is not None else store.clock(conn)
    report = PruneReport(dry_run=dry_run, now=clock)
    pruner = store.Pruner(conn, schema, batch_size=settings.prune_batch_size, dry_run=dry_run)
    for name in names:
        if stop is not None and stop.is_set():
            break
        w = registered.get(name)
        retention = effective(w.retain if w is not None else None, settings.retain)
        cutoff = _cutoff(clock, retention)
        counts = PruneCounts()
        if cutoff is not None:
            counts = pruner.prune_watch(
                name,
                cutoff,
                keep_newest=w is not None and w.method == "logical",
                stop=stop,
            )
        report.watches.append(WatchPrune(name, w is not None, retention, cutoff, counts))
    default = effective(None, settings.retain)
    if only is None and default.period is not None and not (stop is not None and stop.is_set()):
        report.sources_cutoff = _cutoff(clock, default)
        assert report.sources_cutoff is not None
        report.sources = pruner.prune_sources(report.sources_cutoff, stop=stop)
    return report


def describe(counts: PruneCounts) -> str:
    """The counts in words, for logs and ``pgherald prune``."""
    parts = [
        f"{counts.events:,} events",
        f"{counts.fields:,} field rows",
        f"{counts.deliveries:,} deliveries",
        f"{counts.attempts:,} attempts",
        f"{counts.runs:,} runs",
        f"{counts.errors:,} errors",
    ]
    held = []
    if counts.held_open:
        held.append(f"{counts.held_open:,} with open deliveries")
    if counts.held_unrouted:
        held.append(f"{counts.held_unrouted:,} not routed yet")
    if counts.kept_newest:
        held.append(f"{counts.kept_newest:,} newest row versions")
    if counts.kept_shape:
        held.append(f"{counts.kept_shape:,} row shape records")
    text = ", ".join(parts)
    if held:
        text += "; kept though older: " + ", ".join(held)
    return text


class PruneJob:
    """Runs a prune pass every ``interval`` in the daemon, the first one at start.

    Pruning is housekeeping: a failed pass is logged and the next one tries again, it
    never stops capture or delivery. A pass that finds the prune lock taken (another
    instance, or `pgherald prune`) skips its turn.
    """

    def __init__(self, settings: Settings, interval: timedelta) -> None:
        self.settings = settings
        """Read at each pass: a reloaded configuration's retentions apply from the next."""
        self.interval = interval
        self.passes = 0
        self.last: PruneReport | None = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(stop)
            stop.wait(self.interval.total_seconds())

    def run_once(self, stop: threading.Event | None = None) -> PruneReport | None:
        try:
            report = prune(self.settings, stop=stop)
        except PruneBusy:
            log.info("another pgherald is pruning this change log; skipping this turn")
            return None
        except (psycopg.OperationalError, ConnectionFailed) as e:
            log.warning("prune: lost the store (%s); next turn in %s", _line(e), self.interval)
            return None
        except (psycopg.Error, PgHeraldError) as e:
            log.error("prune failed: %s; next turn in %s", _line(e), self.interval)
            return None
        except Exception:  # a bug: said with its traceback, and capture goes on
            log.exception("prune failed; next turn in %s", self.interval)
            return None
        self.passes += 1
        self.last = report
        total = report.total
        if total.events or total.runs or total.errors or total.held:
            log.info("pruned the change log: %s", describe(total))
        return report


def job_for(settings: Settings) -> PruneJob | None:
    """The daemon's prune job, unless ``prune_interval`` is ``off``."""
    interval = parse_interval(settings.prune_interval, "prune_interval")
    return None if interval is None else PruneJob(settings, interval)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def set_retain(settings: Settings, name: str, retain: Retention | None) -> None:
    """Sets a watch's retention (``None``: back to the configuration's default)."""
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        registry.set_watch_retain(
            conn, settings.schema, name, retain.text if retain is not None else None
        )
        conn.commit()


__all__ = ["PruneBusy", "PruneJob", "PruneReport", "WatchPrune", "describe", "job_for", "prune"]
