"""Pruning the change log by age, on a real server: a synthetic year pruned to 90 days
leaves exactly what an independent computation says, with a writer appending all along;
what capture reads back (the newest version of a row, the last row shape) stays and still
completes later updates; unrouted events and events with open deliveries stay; one pass
at a time."""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgherald import pruning
from pgherald.config import Settings
from pgherald.events.model import ChangeEvent, ColumnSpec, RowImage, RowShape
from pgherald.store import checkpoints, migrations, watches
from pgherald.store.changelog import ChangeLog
from pgherald.store.retention import ROUTER_CHECKPOINT
from tests.conftest import Database
from tests.retention_data import SHAPE, SINK, Writer, fill_year

SCHEMA = "pgherald"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ROW_OPS = ("insert", "update", "delete", "read")
OPEN = ("pending", "delivering", "failed")
KEY_SHAPE = RowShape((ColumnSpec("id", 23, "integer"),))


def register(conn: psycopg.Connection[Any], name: str, method: str, retain: str | None) -> None:
    watches.add_watch(
        conn, SCHEMA, watches.Watch(name, "public", name, method, ("id",), retain=retain)
    )


def scalar(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query.encode(), params).fetchone()
    assert row is not None
    return row[0]


def table_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    tables = ("events", "event_fields", "deliveries", "delivery_attempts", "runs", "errors")
    return {t: int(scalar(conn, f"SELECT count(*) FROM {SCHEMA}.{t}")) for t in tables}


def expected_remaining(
    conn: psycopg.Connection[Any], cutoffs: dict[str, datetime], logical: set[str]
) -> set[int]:
    """The event ids that a prune must leave, computed in Python from the rows themselves
    (not with the pruner's SQL): young events, events with open deliveries, each watch's
    last full row and later schema event, and for logical watches the newest version of
    every row unless that is a delete with nothing older of the row staying."""
    open_ids = {
        int(r[0])
        for r in conn.execute(
            b"SELECT event_id FROM pgherald.deliveries WHERE status = ANY (%s)", (list(OPEN),)
        )
    }
    by_watch: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for r in conn.execute(
        b"SELECT id, watch, op, row_key, captured_at, shape_id, old_shape_id, old_values_source,"
        b" meta ? 'type_oids_after' FROM pgherald.events ORDER BY id"
    ):
        by_watch[str(r[1])].append(r)
    keep: set[int] = set()
    for watch, rows in by_watch.items():
        cutoff = cutoffs.get(watch)
        if cutoff is None:
            keep.update(int(r[0]) for r in rows)
            continue
        full = [
            r
            for r in rows
            if r[2] in ROW_OPS
            and r[5] is not None
            and r[6] is None
            and (r[2] != "delete" or r[7] != "none")
        ]
        keepers = {int(full[-1][0])} if full else set()
        last_full = max(keepers, default=0)
        schema_events = [r for r in rows if r[2] == "schema" and r[8] and r[0] > last_full]
        keepers |= {int(schema_events[-1][0])} if schema_events else set()
        young = {int(r[0]) for r in rows if r[4] >= cutoff}
        stay = young | keepers | {int(r[0]) for r in rows if int(r[0]) in open_ids}
        if watch in logical:
            history: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
            for r in rows:
                if r[3] is not None and r[2] in ROW_OPS:
                    history[r[3]].append(r)
            for versions in history.values():
                newest = versions[-1]
                older_stay = any(int(v[0]) in stay for v in versions[:-1])
                if newest[2] != "delete" or older_stay:
                    stay.add(int(newest[0]))
        keep |= stay
    return keep


def newest_versions(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """The newest row version of each row of ``orders`` (the writer's rows left out)."""
    rows = conn.execute(
        b"SELECT DISTINCT ON (row_key) row_key, id FROM pgherald.events"
        b" WHERE watch = 'orders' AND op = ANY (%s) AND event_id NOT LIKE 'writer/%%'"
        b" ORDER BY row_key, id DESC",
        (list(ROW_OPS),),
    ).fetchall()
    return {str(k): int(str(i)) for k, i in rows}


class LockWaits(threading.Thread):
    """Samples the database's sessions every few milliseconds for any that waits for a lock."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.samples = 0
        self.seen: list[tuple[Any, ...]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    self.seen += conn.execute(
                        b"SELECT application_name, wait_event, left(query, 80)"
                        b" FROM pg_stat_activity"
                        b" WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    ).fetchall()
                    self.samples += 1
                    time.sleep(0.005)
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.fixture
def store(db_primary: Database) -> Database:
    with db_primary.connect() as conn:
        migrations.install(conn, SCHEMA)
    return db_primary


@pytest.mark.slow
def test_a_year_pruned_to_90_days_leaves_exactly_what_it_should(store: Database) -> None:
    n = 300_000
    with store.connect() as conn:
        register(conn, "orders", "logical", "90d")
        register(conn, "audit", "trigger", "90d")
        register(conn, "nightly", "snapshot", "90d")
        fill_year(conn, NOW, n)
        conn.execute(
            b"INSERT INTO pgherald.subscriptions (sink, watch) VALUES (%s, 'orders')", (SINK,)
        )
        last = scalar(conn, "SELECT max(id) FROM pgherald.events")
        checkpoints.save_checkpoint(conn, SCHEMA, ROUTER_CHECKPOINT, str(last))
        cutoffs = {
            "orders": NOW - timedelta(days=90),
            "audit": NOW - timedelta(days=90),
            "nightly": NOW - timedelta(days=90),
            "gone": NOW - timedelta(days=30),  # removed: the configuration's retain
        }
        remaining = expected_remaining(conn, cutoffs, logical={"orders"})
        conn.execute(b"CREATE TABLE expected (id bigint PRIMARY KEY)")
        with conn.cursor().copy(b"COPY expected FROM STDIN") as copy:
            for event_id in remaining:
                copy.write_row((event_id,))
        want = {
            "events": len(remaining),
            "event_fields": scalar(
                conn,
                "SELECT count(*) FROM pgherald.event_fields WHERE event_id IN (TABLE expected)",
            ),
            "deliveries": scalar(
                conn, "SELECT count(*) FROM pgherald.deliveries WHERE event_id IN (TABLE expected)"
            ),
            "delivery_attempts": scalar(
                conn,
                "SELECT count(*) FROM pgherald.delivery_attempts a JOIN pgherald.deliveries d"
                " ON d.id = a.delivery_id WHERE d.event_id IN (TABLE expected)",
            ),
            # A run stays if it is young, its watch's latest, or one of its events stays.
            "runs": scalar(
                conn,
                """SELECT count(*) FROM pgherald.runs r
                   WHERE r.started_at >= CASE WHEN r.watch IS NULL THEN %(s)s ELSE %(w)s END
                      OR r.id = (SELECT max(id) FROM pgherald.runs x
                                 WHERE x.watch IS NOT DISTINCT FROM r.watch)
                      OR EXISTS (SELECT FROM pgherald.events e JOIN expected USING (id)
                                 WHERE e.watch = r.watch AND e.position = r.id::text)""",
                {"s": NOW - timedelta(days=30), "w": NOW - timedelta(days=90)},
            ),
            "errors": scalar(
                conn,
                """SELECT count(*) FROM pgherald.errors
                   WHERE occurred_at >= CASE WHEN watch IS NULL THEN %(s)s ELSE %(w)s END""",
                {"s": NOW - timedelta(days=30), "w": NOW - timedelta(days=90)},
            ),
        }
        newest_before = newest_versions(conn)
        before = table_counts(conn)
    # Sanity of the synthetic year itself: it has what the rules are about.
    assert before["events"] > n and want["events"] < before["events"] / 3
    assert 0 < want["deliveries"] < before["deliveries"]
    assert 0 < want["runs"] < before["runs"] and 0 < want["errors"] < before["errors"]

    settings = Settings(dsn=store.dsn, schema=SCHEMA, retain="30d")
    dry = pruning.prune(settings, dry_run=True, now=NOW)
    with store.connect() as conn:
        assert table_counts(conn) == before  # a dry run changes nothing
    assert dry.total.events == before["events"] - want["events"]

    writer = Writer(store.dsn, NOW)
    waits = LockWaits(store.dsn)
    writer.start()
    waits.start()
    try:
        started = time.monotonic()
        report = pruning.prune(settings, now=NOW)
        seconds = time.monotonic() - started
    finally:
        writer.finish()
        waits.stop.set()
        waits.join(30)
    assert writer.error is None and waits.error is None
    assert waits.samples > 100 and waits.seen == []  # nobody ever waited for a lock
    total = report.total

    with store.connect() as conn:
        after = table_counts(conn)
        written = len(writer.event_ids)
        assert after["events"] == want["events"] + written
        assert after == {**want, "events": want["events"] + written}
        stored = {
            int(str(r[0]))
            for r in conn.execute(
                b"SELECT id FROM pgherald.events WHERE event_id NOT LIKE 'writer/%'"
            )
        }
        assert stored == remaining
        assert (
            scalar(conn, "SELECT count(*) FROM pgherald.events WHERE event_id LIKE 'writer/%'")
            == written
        )
        # The newest version of every row of the logical watch is still there, unless the
        # row is gone (its newest version a delete) and nothing older of it stayed.
        newest_after = newest_versions(conn)
        for row_key, event_id in newest_after.items():
            assert newest_before[row_key] == event_id
        gone = set(newest_before) - set(newest_after)
        if gone:
            ops = {
                r[0]
                for r in conn.execute(
                    b"SELECT DISTINCT op FROM pgherald.events WHERE id = ANY (%s)",
                    ([newest_before[k] for k in gone],),
                )
            }
            assert ops <= {"delete"}
    # The dry run's counts are the prune's, and the prune's are what went.
    assert dry.total.as_dict() | {"batches": 0} == total.as_dict() | {"batches": 0}
    assert total.events == before["events"] - want["events"]
    assert total.fields == before["event_fields"] - want["event_fields"]
    assert total.deliveries == before["deliveries"] - want["deliveries"]
    assert total.attempts == before["delivery_attempts"] - want["delivery_attempts"]
    assert total.runs == before["runs"] - want["runs"]
    assert total.errors == before["errors"] - want["errors"]
    assert total.held_open > 0 and total.kept_newest > 0 and total.kept_shape > 0

    lat = sorted(writer.latencies)
    p99 = lat[int(len(lat) * 0.99)]
    print(
        f"\npruned {total.events:,} events ({total.fields:,} field rows, {total.deliveries:,}"
        f" deliveries, {total.attempts:,} attempts) in {seconds:.1f} s:"
        f" {total.events / seconds:,.0f} events/s in {total.batches} batches;"
        f" writer: {len(lat)} appends, p50 {statistics.median(lat) * 1000:.1f} ms,"
        f" p99 {p99 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms; {waits.samples} samples"
        " of pg_stat_activity, no lock wait"
    )
    # Never blocked for long: the worst append is the machine's noise, not a batch's length.
    assert lat[-1] < 0.5


def append_at(log: ChangeLog, at: datetime, n: int, op: str, key: str, **kw: Any) -> None:
    log.append(
        [
            ChangeEvent(
                event_id=f"e/{n}",
                watch=kw.pop("watch", "orders"),
                op=op,  # type: ignore[arg-type]
                schema="public",
                table="orders",
                key={"id": key},
                old=kw.pop("old", None),
                new=kw.pop("new", None),
                changed=kw.pop("changed", ()),
                xid=n,
                position=f"0/{n:X}",
                commit_time=at,
                captured_at=at,
                method="logical",
                old_values=kw.pop("old_values", "none"),
            )
        ]
    )


def row(key: str, v: str) -> RowImage:
    return RowImage(SHAPE, (key, v))


def test_newest_version_of_a_row_stays_and_completes_the_next_update(db: Database) -> None:
    old = NOW - timedelta(days=200)
    with db.connect() as conn:
        migrations.install(conn, SCHEMA)
        register(conn, "orders", "logical", "90d")
        register(conn, "audit", "trigger", "90d")
        log = ChangeLog(conn, SCHEMA)
        append_at(log, old, 1, "insert", "1", new=row("1", "a"))  # newest of row 1: stays
        append_at(log, old, 2, "insert", "2", new=row("2", "b"))
        append_at(log, old, 3, "delete", "2", old=row("2", "b"), old_values="replica_identity")
        append_at(log, old, 4, "insert", "3", new=row("3", "c"))
        append_at(log, old + timedelta(days=50), 5, "update", "3", new=row("3", "d"))
        append_at(log, old, 6, "insert", "9", new=row("9", "t"), watch="audit")
        append_at(log, old, 7, "delete", "9", old=RowImage(KEY_SHAPE, ("9",)), watch="audit")

    report = pruning.prune(Settings(dsn=db.dsn, schema=SCHEMA), now=NOW)
    by_watch = {w.watch: w.counts for w in report.watches}
    with db.connect() as conn:
        left = {r[0] for r in conn.execute(b"SELECT event_id FROM pgherald.events")}
        # Row 1 and row 3 keep their newest versions; row 2 (deleted) goes whole. The
        # trigger watch keeps only its last full row, which capture reads its shape from.
        assert left == {"e/1", "e/5", "e/6"}
        orders = by_watch["orders"]
        # e/5 is also the watch's last full row: counted as that.
        assert (orders.events, orders.kept_newest, orders.kept_shape) == (3, 1, 1)
        assert by_watch["audit"].events == 1 and by_watch["audit"].kept_shape == 1

        # An update without its old row (REPLICA IDENTITY DEFAULT) is completed from the
        # version that was kept, as if nothing had been pruned.
        log = ChangeLog(conn, SCHEMA)
        append_at(log, NOW, 8, "update", "3", new=row("3", "e"))
        filled = conn.execute(
            b"SELECT old_values, changed, old_values_source FROM pgherald.events"
            b" WHERE event_id = 'e/8'"
        ).fetchone()
        assert filled == (["3", "d"], ["v"], "change_log")
        assert log.last_shape("audit") == SHAPE


def test_open_deliveries_and_unrouted_events_stay(db: Database) -> None:
    old = NOW - timedelta(days=200)
    with db.connect() as conn:
        migrations.install(conn, SCHEMA)
        register(conn, "orders", "trigger", "90d")
        log = ChangeLog(conn, SCHEMA)
        for n in range(1, 11):
            append_at(log, old, n, "insert", str(n), new=row(str(n), "x"))
        ids = [r[0] for r in conn.execute(b"SELECT id FROM pgherald.events ORDER BY id")]
        conn.execute(b"INSERT INTO pgherald.sinks (name, kind) VALUES ('hook', 'webhook')")
        conn.execute(b"INSERT INTO pgherald.subscriptions (sink, watch) VALUES ('hook', 'orders')")
        statuses = ["delivered", "pending", "failed", "dead", "delivering", "delivered"]
        for event_id, status in zip(ids, statuses, strict=False):
            conn.execute(
                b"INSERT INTO pgherald.deliveries (event_id, sink, status) VALUES (%s, 'hook', %s)",
                (event_id, status),
            )
        # The router has looked at the first eight events only.
        checkpoints.save_checkpoint(conn, SCHEMA, ROUTER_CHECKPOINT, str(ids[7]))

    settings = Settings(dsn=db.dsn, schema=SCHEMA)
    dry = pruning.prune(settings, dry_run=True, now=NOW, watch="orders")
    report = pruning.prune(settings, now=NOW, watch="orders")
    counts = report.watches[0].counts
    assert dry.watches[0].counts.as_dict() == counts.as_dict()
    with db.connect() as conn:
        left = [r[0] for r in conn.execute(b"SELECT id FROM pgherald.events ORDER BY id")]
        statuses_left = [
            r[0] for r in conn.execute(b"SELECT status FROM pgherald.deliveries ORDER BY id")
        ]
    # Open: pending, failed, delivering; unrouted: the last two; the newest event of the
    # watch (ids[-1]) is also its last full row, kept for capture's shape in any case.
    assert left == [ids[1], ids[2], ids[4], ids[8], ids[9]]
    assert statuses_left == ["pending", "failed", "delivering"]
    assert (counts.events, counts.deliveries) == (5, 3)
    assert (counts.held_open, counts.held_unrouted) == (3, 2)


def test_one_prune_at_a_time(db: Database) -> None:
    with db.connect() as conn:
        migrations.install(conn, SCHEMA)
        register(conn, "orders", "logical", "90d")
        holder = db.connect()
        holder.execute(b"SELECT pg_advisory_lock(hashtext('pgherald.prune:pgherald'))")
    settings = Settings(dsn=db.dsn, schema=SCHEMA)
    try:
        with pytest.raises(pruning.PruneBusy, match="another prune"):
            pruning.prune(settings)
        job = pruning.PruneJob(settings, timedelta(hours=1))
        assert job.run_once() is None and job.passes == 0
    finally:
        holder.close()
    assert job.run_once() is not None and job.passes == 1


def test_the_daemon_job_prunes_until_stopped(db: Database) -> None:
    old = datetime.now(UTC) - timedelta(days=200)
    with db.connect() as conn:
        migrations.install(conn, SCHEMA)
        register(conn, "orders", "trigger", "90d")
        log = ChangeLog(conn, SCHEMA)
        for n in range(1, 4):
            append_at(log, old, n, "insert", str(n), new=row(str(n), "x"))
    settings = Settings(dsn=db.dsn, schema=SCHEMA, prune_interval="1s")
    job = pruning.job_for(settings)
    assert job is not None and job.interval == timedelta(seconds=1)
    assert pruning.job_for(Settings(dsn=db.dsn, prune_interval="off")) is None
    stop = threading.Event()
    thread = threading.Thread(target=job.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while job.passes < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and job.passes >= 2
    with db.connect() as conn:
        # The newest event stays as the watch's last full row.
        assert scalar(conn, "SELECT count(*) FROM pgherald.events") == 1
