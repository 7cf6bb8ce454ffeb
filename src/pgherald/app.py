"""The composition root: the one place that wires sources, the store and (later) delivery.

The CLI, the Python API and the demo build a ``Settings`` and call in here, so that the
same configuration always gives the same pipeline.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import psycopg

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.delivery.digests import DigestJob
from pgherald.delivery.engine import DeliveryEngine, RetryPolicy
from pgherald.delivery.router import Router
from pgherald.errors import ConfigError
from pgherald.events import ChangeEvent
from pgherald.events.model import RowShape
from pgherald.leadership import Leadership, wait_for_slot
from pgherald.ops import metrics, status
from pgherald.ops.readiness import capture_probe, delivery_probe
from pgherald.sinks.base import Sink, SinkConfig, check_format
from pgherald.snapshots import Scheduler
from pgherald.sources.listen_capture import ListenSource, ListenWatch
from pgherald.sources.listen_capture import checkpoint_name as listen_checkpoint_name
from pgherald.sources.logical import (
    LogicalSettings,
    LogicalSource,
    LogicalWatch,
    checkpoint_name,
)
from pgherald.sources.slot_safety import SlotThresholds
from pgherald.sources.trigger import TriggerSettings, TriggerSource, TriggerWatch
from pgherald.sources.trigger import checkpoint_name as trigger_checkpoint_name
from pgherald.store import checkpoints, deliveries, migrations, watches
from pgherald.store import errors as store_errors
from pgherald.store.changelog import ChangeLog, Statement
from pgherald.store.deliveries import StoredSink
from pgherald.store.queries import query
from pgherald.store.selected import append_selected

log = logging.getLogger("pgherald")


class ChangeLogSink:
    """Backs a source's ``CaptureSink`` with the change log: events and checkpoint commit together.

    It owns one connection in a transaction of its own; nothing else writes through it, so
    a rollback after a lost replication connection forgets exactly the unacknowledged part.
    """

    def __init__(self, dsn: str, schema: str, source: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.source = source
        self._conn: psycopg.Connection[Any] | None = None
        self._log: ChangeLog | None = None
        self._per_watch: Counter[tuple[str, str]] = Counter()  # (watch, method)
        self._held: list[ChangeEvent] = []
        self.stored_events = 0
        self._connection()  # fail fast on a wrong DSN

    def _connection(self) -> psycopg.Connection[Any]:
        """The store connection, opened again after it was lost (lazily, on next use)."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, autocommit=False, application_name="pgherald-store")
            self._log = ChangeLog(self._conn, self.schema)
        return self._conn

    def write(self, events: Sequence[ChangeEvent]) -> None:
        """Adds events to the store transaction.

        The last batch written is held back (one batch at most) and sent by the next
        ``write`` or by ``commit``, whose statements then ride in its last round trip.
        """
        self._check_not_lost()
        self._connection()
        assert self._log is not None
        if self._held:
            self._log.append(self._held, notify=False)  # commit() notifies for all
        self._held = list(events)
        self._per_watch.update((e.watch, e.method) for e in events)
        status.note_progress(self.source)

    def commit(self, position: str, extra: Mapping[str, str] | None = None) -> None:
        """Stores what is held back, notes the watches' activity, saves the checkpoints and
        commits; the statements and the COMMIT go in the batch's last pipeline.

        This runs for every batch, so it costs no round trip of its own: the statements are
        what ``watches.record_watch_activity`` and ``checkpoints.save_checkpoint`` run (one
        by one, with a search path each, when called on their own).
        """
        self._check_not_lost()
        self._connection()
        assert self._log is not None

        statements: list[Statement] = [
            (
                query("record_watch_activity"),
                {"name": name, "changes": count, "ok": True, "error": None},
            )
            for name, count in _by_watch(self._per_watch).items()
        ]
        statements += [
            (query("save_checkpoint"), {"source": source, "position": value})
            for source, value in ((self.source, position), *(extra or {}).items())
        ]
        held, self._held = self._held, []
        self._log.append(held, then=statements, commit=True)
        metrics.captured(self._per_watch)
        status.note_progress(self.source)
        self.stored_events += sum(self._per_watch.values())
        self._per_watch.clear()

    def commit_selected(
        self,
        rows: psycopg.sql.Composable,
        params: Mapping[str, Any],
        shapes: Mapping[str, RowShape],
        position: str,
    ) -> int:
        """Stores the events that ``rows`` makes in the server (a source's SELECT over what
        it claimed in this transaction: the trigger queue), saves the checkpoint and
        commits, in one round trip; returns how many events were stored."""
        self._check_not_lost()
        self._connection()
        assert self._log is not None and not self._held and not self._per_watch
        stored = append_selected(
            self._log,
            rows,
            params,
            shapes,
            then=[(query("save_checkpoint"), {"source": self.source, "position": position})],
            commit=True,
        )
        metrics.captured(stored)
        status.note_progress(self.source)
        self.stored_events += sum(stored.values())
        return sum(stored.values())

    def _check_not_lost(self) -> None:
        """Refuses to go on in a new connection while the lost one held written events: a
        checkpoint committed without them would skip them for good."""
        if (self._conn is None or self._conn.closed) and (self._held or self._per_watch):
            raise psycopg.OperationalError(
                "the store connection was lost in the middle of a batch; capture resumes"
                " from the last checkpoint"
            )

    def rollback(self) -> None:
        """Forgets the uncommitted part; never raises, so a source can always call it."""
        self._per_watch.clear()
        self._held = []
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.rollback()
            except psycopg.Error:
                self._conn.close()

    def connection(self) -> psycopg.Connection[Any]:
        """The store connection, for a source that claims its input in the same transaction
        as it stores it (the trigger queue)."""
        return self._connection()

    def checkpoint(self, name: str | None = None) -> str | None:
        conn = self._connection()
        position = checkpoints.load_checkpoint(conn, self.schema, name or self.source)
        conn.commit()
        return position

    def last_shapes(self, watches: Sequence[str]) -> dict[str, RowShape]:
        """Each watch's shape as the change log last recorded it (``ChangeLog.last_shape``)."""
        conn = self._connection()
        assert self._log is not None
        found = {name: self._log.last_shape(name) for name in watches}
        conn.commit()
        return {name: shape for name, shape in found.items() if shape is not None}

    def last_commit_time(self, watches: Sequence[str]) -> datetime | None:
        """The commit time of the latest event stored for these watches (None if none): a
        point before which the change log is known complete, for a gap's start."""
        conn = self._connection()
        found = checkpoints.last_commit_time(conn, self.schema, watches)
        conn.commit()
        return found

    def record_error(self, message: str, detail: Mapping[str, Any]) -> None:
        """Keeps a capture problem in the errors table (slot safety's reports), on a short
        connection of its own: the store connection may be busy with a batch in another
        thread."""
        with connect(self.dsn, autocommit=True, application_name="pgherald-store") as conn:
            store_errors.record_error(conn, self.schema, message, source=self.source, detail=detail)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _by_watch(counts: Mapping[tuple[str, str], int]) -> dict[str, int]:
    """Counts per ``(watch, method)`` summed per watch."""
    out: dict[str, int] = {}
    for (name, _), n in counts.items():
        out[name] = out.get(name, 0) + n
    return out


def logical_source_name(settings: Settings) -> str:
    """The checkpoint name of the logical source of these settings."""
    return checkpoint_name(settings.slot)


def registered_watches(settings: Settings, method: str) -> list[watches.Watch]:
    """The enabled watches of one capture method (table watches: those with a table)."""
    with connect(settings, autocommit=True) as conn:
        migrations.require_current(conn, settings.schema)
        found = watches.list_watches(conn, settings.schema)
    return [
        w
        for w in found
        if w.method == method and w.enabled and (method == "listen" or w.table_name)
    ]


def _table_fields(w: watches.Watch) -> dict[str, Any]:
    """What logical and trigger sources both know of a table watch."""
    return {
        "name": w.name,
        "schema": w.schema_name or "",
        "table": w.table_name or "",
        "key_columns": tuple(w.key_columns or ()),
        "columns": tuple(w.columns) if w.columns else None,
        "ignore_columns": tuple(w.ignore_columns or ()),
    }


def logical_watches(settings: Settings) -> list[LogicalWatch]:
    return [
        LogicalWatch(**_table_fields(w), snapshot=bool((w.options or {}).get("snapshot")))
        for w in registered_watches(settings, "logical")
    ]


def build_logical_source(settings: Settings, resync: bool = False) -> LogicalSource:
    found = logical_watches(settings)
    if not found:
        raise ConfigError("no logical watches: add one with `pgherald watch add SCHEMA.TABLE`")
    return LogicalSource(
        LogicalSettings(
            dsn=settings.dsn,
            slot=settings.slot,
            publication=settings.publication,
            batch_size=max(settings.batch_size, 1),
            max_batch_delay=settings.batch_interval,
            resync=resync,
            heartbeat_interval=settings.slot_safety.heartbeat_interval,
            slot_check_interval=settings.slot_safety.check_interval,
            thresholds=SlotThresholds(
                warn_bytes=settings.slot_safety.warn_retained_wal,
                critical_bytes=settings.slot_safety.critical_retained_wal,
                policy_bytes=settings.slot_safety.policy_retained_wal,
                policy=settings.slot_safety.policy,
            ),
        ),
        found,
    )


def trigger_watches(settings: Settings) -> list[TriggerWatch]:
    return [TriggerWatch(**_table_fields(w)) for w in registered_watches(settings, "trigger")]


def build_trigger_source(settings: Settings) -> TriggerSource:
    """The trigger source of these settings, knowing each watch's last stored shape (so a
    column added while pgherald was down gets its schema event)."""
    found = trigger_watches(settings)
    with connect(settings, autocommit=True) as conn:
        changelog = ChangeLog(conn, settings.schema)
        shapes = {w.name: s for w in found if (s := changelog.last_shape(w.name)) is not None}
    return TriggerSource(
        TriggerSettings(
            dsn=settings.dsn,
            store=settings.schema,
            batch_size=max(settings.batch_size, 1),
        ),
        found,
        known_shapes=shapes,
        reload=lambda: trigger_watches(settings),
    )


def listen_watches(settings: Settings) -> list[ListenWatch]:
    return [
        ListenWatch(w.name, tuple((w.options or {}).get("channels", ())))
        for w in registered_watches(settings, "listen")
    ]


def build_listen_source(settings: Settings) -> ListenSource:
    return ListenSource(
        settings.dsn, listen_watches(settings), reload=lambda: listen_watches(settings)
    )


def _run_listen(settings: Settings, source: ListenSource, stop: threading.Event) -> None:
    sink = ChangeLogSink(settings.dsn, settings.schema, listen_checkpoint_name(settings.schema))
    try:
        source.run(sink, stop)
    finally:
        sink.close()


def trigger_source_name(settings: Settings) -> str:
    return trigger_checkpoint_name(settings.schema)


class _SourceThread(threading.Thread):
    """Runs one source until ``stop``; what ended it is kept for whoever joins."""

    def __init__(self, name: str, target: Any, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self._run_source = target
        self.stop = stop
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run_source()
        except BaseException as e:  # handed to whoever joins
            self.error = e
            self.stop.set()


def _run_logical(settings: Settings, source: LogicalSource, stop: threading.Event) -> None:
    sink = ChangeLogSink(settings.dsn, settings.schema, logical_source_name(settings))
    try:
        source.run(sink, stop)
    finally:
        sink.close()


def _run_trigger(settings: Settings, source: TriggerSource, stop: threading.Event) -> None:
    sink = ChangeLogSink(settings.dsn, settings.schema, trigger_source_name(settings))
    try:
        source.run(sink, stop)
    finally:
        sink.close()


def run(
    settings: Settings,
    stop: threading.Event,
    resync: bool = False,
    web: tuple[str, int] | None = None,
) -> None:
    """Captures the configured watches into the change log, runs due snapshot watches, and
    routes and delivers events to the sinks, until ``stop`` is set.

    ``web`` serves the web console on ``(host, port)`` beside them. ``pgherald.daemon``
    does the work (and more: only some parts, reloading, a bound on stopping).
    """
    from pgherald.daemon import Daemon, Roles  # it imports this module

    Daemon(settings, Roles(web=web), stop=stop, resync=resync).run()


class Capture:
    """Capture in background threads (one per method with watches), for ``run``, the demo,
    the Python API and tests. ``errors`` holds what ended a thread, so callers can report it.
    """

    def __init__(
        self,
        settings: Settings,
        resync: bool = False,
        stop: threading.Event | None = None,
        *,
        sources: bool = True,
        snapshots: bool = True,
    ) -> None:
        """``sources=False`` leaves out the logical, trigger and listen sources and
        ``snapshots=False`` the snapshot scheduler (``pgherald run --no-capture``,
        ``--no-snapshots``: the parts run in other processes)."""
        self.settings = settings
        self.stop = stop or threading.Event()
        logical = logical_watches(settings) if sources else []
        triggered = trigger_watches(settings) if sources else []
        listened = listen_watches(settings) if sources else []
        snapshot = registered_watches(settings, "snapshot") if snapshots else []
        if sources and not snapshots and not logical and not triggered and not listened:
            raise ConfigError(
                "no logical, trigger or listen watches to capture (snapshot watches are left"
                " to another process by --no-snapshots): add one with `pgherald watch add`"
            )
        if snapshots and not sources and not snapshot:
            raise ConfigError(
                "no snapshot watches to run (capture is left to another process by"
                " --no-capture): add one with `pgherald watch add NAME --query ...`"
            )
        if not logical and not triggered and not listened and not snapshot:
            raise ConfigError("no watches: add one with `pgherald watch add SCHEMA.TABLE`")
        self.source: LogicalSource | None = (
            build_logical_source(settings, resync=resync) if logical else None
        )
        self.trigger: TriggerSource | None = build_trigger_source(settings) if triggered else None
        self.listen: ListenSource | None = build_listen_source(settings) if listened else None
        self.threads: list[_SourceThread] = []
        # One instance of several captures each part: the one that holds its lock.
        self.leadership = Leadership(settings.dsn, settings.schema, self.stop)
        if self.source is not None:
            source = self.source
            self.threads.append(
                _SourceThread(
                    "pgherald-logical",
                    self._led(
                        logical_source_name(settings),
                        f"logical capture (slot {settings.slot})",
                        lambda term: self._lead_logical(source, term),
                    ),
                    self.stop,
                )
            )
        if self.trigger is not None:
            trigger = self.trigger
            self.threads.append(
                _SourceThread(
                    "pgherald-trigger",
                    self._led(
                        trigger_source_name(settings),
                        "trigger capture",
                        lambda term: self._lead_trigger(trigger, term),
                    ),
                    self.stop,
                )
            )

        # Always there: it also picks up snapshot watches added while pgherald runs.
        self.scheduler: Scheduler | None = Scheduler(settings) if snapshots else None
        if self.scheduler is not None:
            scheduler = self.scheduler
            self.threads.append(
                _SourceThread(
                    "pgherald-snapshots",
                    self._led("snapshots", "the snapshot scheduler", scheduler.run),
                    self.stop,
                )
            )
        if self.listen is not None:
            listen = self.listen
            self.threads.append(
                _SourceThread(
                    "pgherald-listen",
                    self._led(
                        listen_checkpoint_name(settings.schema),
                        "listen capture",
                        lambda term: self._lead_listen(listen, term),
                    ),
                    self.stop,
                )
            )

    def _led(
        self, name: str, title: str, body: Callable[[threading.Event], None]
    ) -> Callable[[], None]:
        """A source thread's target: ``body(term)`` whenever this process leads ``name``."""
        role = self.leadership.role(name, title)
        return lambda: self.leadership.lead(role, body)

    def _lead_logical(self, source: LogicalSource, term: threading.Event) -> None:
        """A term of logical capture: the watches as they are now, once the previous
        leader's walsender let go of the slot; the source resumes from the checkpoint."""
        source.watches = logical_watches(self.settings) or source.watches
        wait_for_slot(self.settings.dsn, self.settings.slot, term)
        _run_logical(self.settings, source, term)

    def _lead_trigger(self, trigger: TriggerSource, term: threading.Event) -> None:
        """A term of trigger capture: the watches and each one's last stored shape as they
        are now (another instance may have captured since this one last did)."""
        found = trigger_watches(self.settings) or trigger.watches
        with connect(self.settings, autocommit=True) as conn:
            changelog = ChangeLog(conn, self.settings.schema)
            shapes = {w.name: s for w in found if (s := changelog.last_shape(w.name)) is not None}
        trigger.watches = found
        trigger.assembler.watches = found
        trigger.assembler.restore(shapes)
        _run_trigger(self.settings, trigger, term)

    def _lead_listen(self, listen: ListenSource, term: threading.Event) -> None:
        listen.watches = listen_watches(self.settings) or listen.watches
        _run_listen(self.settings, listen, term)

    @property
    def errors(self) -> list[BaseException]:
        """What ended a source thread or the leadership elector (empty while all run)."""
        found = [t.error for t in self.threads if t.error is not None]
        return found if self.leadership.error is None else [self.leadership.error, *found]

    def describe(self) -> str:
        parts = []
        if self.source is not None:
            parts.append(f"{len(self.source.watches)} logical watch(es)")
        if self.trigger is not None:
            parts.append(f"{len(self.trigger.watches)} trigger watch(es)")
        if self.listen is not None:
            parts.append(f"{len(self.listen.watches)} listen watch(es)")
        if self.scheduler is not None:
            parts.append("the snapshot scheduler")
        return " and ".join(parts)

    def start(self) -> Capture:
        status.register(self, "capture", capture_probe(self))
        self.leadership.start()
        for t in self.threads:
            t.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Returns once every source this process leads is connected (a part that another
        instance leads is ready by standing by); raises what stopped one otherwise."""
        deadline = time.monotonic() + timeout
        parts = [
            (self.leadership.roles[name], source.connected)
            for name, source in (
                (logical_source_name(self.settings), self.source),
                (trigger_source_name(self.settings), self.trigger),
                (listen_checkpoint_name(self.settings.schema), self.listen),
                ("snapshots", self.scheduler),
            )
            if source is not None
        ]
        while not all(
            role.decided.is_set() and (connected.is_set() or not role.leading.is_set())
            for role, connected in parts
        ):
            if self.errors:
                raise self.errors[0]
            if time.monotonic() > deadline:
                raise TimeoutError("capture did not start in time")
            time.sleep(0.02)

    def close(self, timeout: float = 10.0) -> None:
        status.unregister(self)
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        self.leadership.close()  # after the sources stored their last batches
        if self.errors:
            raise self.errors[0]


# -- delivery ---------------------------------------------------------------------------------

SINK_KINDS: Final = (
    "webhook", "amqp", "nats", "redis", "mqtt", "replica", "stdout", "feed", "email",
)  # fmt: skip


def build_sink(config: SinkConfig) -> Sink:
    """The sink of a configuration (its module checks the options: one ConfigError each)."""
    if config.kind not in SINK_KINDS:
        raise ConfigError(
            f"sink {config.name!r}: unknown kind {config.kind!r};"
            f" use one of {', '.join(SINK_KINDS)}"
        )
    module = importlib.import_module(f"pgherald.sinks.{config.kind}")
    sink: Sink = module.from_config(config)
    return sink


def sink_config(stored: StoredSink) -> SinkConfig:
    return SinkConfig(
        name=stored.name,
        kind=stored.kind,
        format=check_format(stored.format),
        options=stored.options,
        strictly_ordered=stored.strictly_ordered,
    )


IN_PROCESS_KINDS: Final = ("python",)
"""Sinks that the Python API serves in its own process (its callbacks' dead letters):
delivery workers leave them alone."""


class SinkCatalog:
    """The sinks a delivery process serves, built from the store's rows: what
    ``DeliveryEngine`` asks for when the sinks change.

    A row that did not change keeps the sink built for it, so the engine leaves it running.
    A sink whose options cannot be built (a row changed by hand) is said once, as an error
    in the log, and left out: one bad sink, of one user, does not stop delivery to the
    others. Each sink built for the first time gets the store's presentation settings
    (``mailing.use_presentation``), and the secrets of its options are masked in the logs.
    """

    def __init__(
        self,
        settings: Settings,
        names: Sequence[str] | None = None,
        overrides: Mapping[str, Sink] | None = None,
    ) -> None:
        self.settings = settings
        self.names = set(names) if names is not None else None
        self.overrides = dict(overrides or {})
        self._built: dict[str, tuple[StoredSink, Sink]] = {}
        self._refused: dict[str, StoredSink] = {}

    def build(self, stored: Sequence[StoredSink]) -> dict[str, tuple[Sink, StoredSink]]:
        """The sinks to serve among ``stored``: the enabled ones (of ``names``, if given)."""
        from pgherald import logs, mailing

        out: dict[str, tuple[Sink, StoredSink]] = {}
        fresh: list[Sink] = []
        for s in stored:
            if not s.enabled or s.kind in IN_PROCESS_KINDS:
                continue
            if self.names is not None and s.name not in self.names:
                continue
            known = self._built.get(s.name)
            if known is not None and _same_sink(known[0], s):
                out[s.name] = (known[1], s)
                continue
            try:
                sink = self.overrides.get(s.name) or build_sink(sink_config(s))
            except ConfigError as e:
                refused = self._refused.get(s.name)
                if refused is None or not _same_sink(refused, s):
                    log.error("sink %r is not served: %s", s.name, e, extra={"sink": s.name})
                    self._refused[s.name] = s
                continue
            self._refused.pop(s.name, None)
            logs.add_secrets(logs.secrets_in_options(s.options))
            fresh.append(sink)
            out[s.name] = (sink, s)
        if fresh:
            mailing.use_presentation(self.settings, fresh)
        self._built = {name: (s, sink) for name, (sink, s) in out.items()}
        return out


def _same_sink(a: StoredSink, b: StoredSink) -> bool:
    """The same definition (a sink removed and added again is a new one)."""
    return a == b


class Delivery:
    """Routing and delivery in background threads, for ``pgherald run`` and tests.

    ``sinks`` restricts delivery to some sinks (all enabled ones by default). The sinks
    are those of the store as they change while it runs: the engine reads them again when
    told (``SinkCatalog`` builds them) and hands the digest sinks to the digest job.
    ``idle_close``, ``sweep``, ``refresh`` and ``max_connections`` are the engine's
    (``DeliveryEngine``); ``max_connections`` is the ``delivery_connections`` setting unless
    given.
    """

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event | None = None,
        sinks: Sequence[str] | None = None,
        batch_size: int = 500,
        policy: RetryPolicy | None = None,
        overrides: Mapping[str, Sink] | None = None,
        *,
        idle_close: float = 10.0,
        sweep: float = 5.0,
        refresh: float = 30.0,
        max_connections: int | None = None,
    ) -> None:
        from pgherald import mailing

        self.settings = settings
        self.stop = stop or threading.Event()
        with connect(settings, autocommit=True) as conn:
            migrations.require_current(conn, settings.schema)
            stored = deliveries.list_sinks(conn, settings.schema)
        self.catalog = SinkCatalog(settings, sinks, overrides)
        built, digest_sinks = mailing.split(self.catalog.build(stored))
        self._digest_sinks = digest_sinks
        self.router = Router(settings)
        self.engine = DeliveryEngine(
            settings,
            built,
            batch_size=batch_size,
            policy=policy,
            catalog=self._serve,
            idle_close=idle_close,
            sweep=sweep,
            refresh=refresh,
            max_connections=max_connections or settings.delivery_connections,
        )
        self.digests = DigestJob(settings, digest_sinks, policy=policy)
        digests = self.digests
        self.threads = [
            _SourceThread("pgherald-router", lambda: self.router.run(self.stop), self.stop),
            _SourceThread(
                "pgherald-delivery", lambda: self.engine.run_blocking(self.stop), self.stop
            ),
            _SourceThread("pgherald-digests", lambda: digests.run_blocking(self.stop), self.stop),
        ]

    def _serve(self, stored: Sequence[StoredSink]) -> dict[str, tuple[Sink, StoredSink]]:
        """The engine's catalog: the sinks it serves now; the digest job gets the rest."""
        from pgherald import mailing

        engine, digest_sinks = mailing.split(self.catalog.build(stored))
        if digest_sinks != self._digest_sinks:
            self._digest_sinks = digest_sinks
            self.digests.replace_sinks(digest_sinks)
        return engine

    @property
    def errors(self) -> list[BaseException]:
        return [t.error for t in self.threads if t.error is not None]

    def start(self) -> Delivery:
        status.register(self, "delivery", delivery_probe(self))
        for t in self.threads:
            t.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        ready = [self.router.connected, self.engine.connected, self.digests.connected]
        for event in ready:
            while not event.wait(0.05):
                if self.errors:
                    raise self.errors[0]
                if time.monotonic() > deadline:
                    raise TimeoutError("delivery did not start in time")

    def close(self, timeout: float = 30.0) -> None:
        status.unregister(self)
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        if self.errors:
            raise self.errors[0]
