"""Shared helpers for the logical-capture proofs: install, run, catch up, read, compare.

Capture is proved against the truth, so this module gives the tests three things:

- a way to run capture as users do (``pgherald run`` in a subprocess, which can be
  SIGKILLed) or in-process (``app.Capture``, quicker for the many small cases);
- a way to know capture has caught up without sleeping: a *sentinel* row written after
  the workload, in a watched table of its own; once its event is in the log, so is every
  transaction that committed before it (the log is in commit order);
- two independent truths to compare the stored log with: the text output of a second
  slot using ``test_decoding`` (PostgreSQL's own plugin, read under the same canonical
  session settings as the replication connection, so the value texts are comparable),
  and the tables' final contents, which replaying the log must reproduce.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgherald import admin, app
from pgherald.config import Settings
from pgherald.db.types import canonical_options
from pgherald.events import ChangeEvent, RowImage
from pgherald.events.model import UNCHANGED_TOAST, Text
from pgherald.store.changelog import ChangeLog

SENTINEL_TABLE = "pgherald_sentinel"
SENTINEL_WATCH = "pgherald_sentinel"
PGHERALD = Path(sys.executable).with_name("pgherald")

Conn = psycopg.Connection[Any]


# -- installing ------------------------------------------------------------------------------


def settings_for(dsn: str, **overrides: Any) -> Settings:
    """Settings for a test database: quick batches, so catching up takes milliseconds.

    Slots belong to the cluster, not the database: each test database gets a slot named
    after it, so a test that fails while its slot is held cannot break the next one.
    """
    dbname = conninfo_to_dict(dsn).get("dbname") or "postgres"
    base: dict[str, Any] = {
        "dsn": dsn,
        "batch_interval": 0.02,
        "slot": f"pgherald_{dbname}"[:63],
    }
    base.update(overrides)
    return Settings(**base)


def install(
    dsn: str,
    tables: Iterable[str] = (),
    *,
    settings: Settings | None = None,
    slot: bool = True,
    **watch_options: Any,
) -> Settings:
    """Installs the store, a sentinel table and a watch on each of ``tables``.

    The slot is created last (as ``watch add`` on the CLI path does), so every change made
    after this returns is kept for capture.
    """
    settings = settings or settings_for(dsn)
    admin.init(settings)
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, token text NOT NULL)"
            ).format(sql.Identifier(SENTINEL_TABLE))
        )
    admin.add_watch(settings, ("public", SENTINEL_TABLE), name=SENTINEL_WATCH)
    for table in tables:
        admin.add_watch(settings, table, **watch_options)
    if slot:
        ensure_slot(settings)
    return settings


def ensure_slot(settings: Settings) -> bool:
    """Creates pgherald's slot if capture never ran (``admin.ensure_slot``, once in ``app``)."""
    ensure = getattr(admin, "ensure_slot", None) or getattr(app, "ensure_slot")  # noqa: B009
    return bool(ensure(settings))


# -- running capture -------------------------------------------------------------------------


@contextmanager
def capturing(settings: Settings, resync: bool = False) -> Iterator[app.Capture]:
    """Capture in a background thread for the duration of the block; its errors re-raise."""
    capture = app.Capture(settings, resync=resync).start()
    try:
        capture.wait_ready()
        yield capture
    finally:
        try:
            capture.close(timeout=30)
        finally:
            wait_released(settings)


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without PGHERALD_* and PG* variables, so only our flags count."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PGHERALD_") and not k.startswith("PG")
    }
    env.update(extra or {})
    return env


class CaptureProcess:
    """``pgherald run`` as a subprocess, as an operator runs it; killable at any moment.

    Its stderr goes to a file (a pipe nobody reads would block it), which ``log()`` reads
    back so that a failure message can say what the process said.
    """

    def __init__(
        self,
        settings: Settings,
        *args: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.args = args
        self.env = cli_env(env)
        fd, name = tempfile.mkstemp(prefix="pgherald-run-", suffix=".log")
        os.close(fd)
        self.logfile = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        s = self.settings
        return [
            str(PGHERALD),
            "--dsn",
            s.dsn,
            "--schema",
            s.schema,
            "--slot",
            s.slot,
            "--publication",
            s.publication,
            "run",
            *self.args,
        ]

    def start(self) -> CaptureProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.logfile, "ab") as err:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=self.env,
                cwd=tempfile.gettempdir(),
            )
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Returns once this process holds the slot (its replication stream is open), or,
        without logical watches, once its trigger drainer is connected."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.settings.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise AssertionError(f"pgherald run exited early:\n{self.log()[-3000:]}")
                if slot_holder(conn, self.settings.slot) is not None:
                    return
                trigger = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'pgherald-trigger'"
                ).fetchone()
                if trigger and trigger[0] and not self._has_logical_watches(conn):
                    return
                time.sleep(0.05)
        raise AssertionError(f"pgherald run did not open its stream in time:\n{self.log()[-3000:]}")

    def _has_logical_watches(self, conn: Conn) -> bool:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE method = 'logical'").format(
                sql.Identifier(self.settings.schema, "watches")
            )
        ).fetchone()
        return bool(row and row[0])

    def kill(self) -> None:
        """SIGKILL: no chance to flush, commit or say goodbye."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return int(self.proc.wait(timeout))

    def close(self) -> None:
        if self.alive():
            self.kill()
        wait_released(self.settings)
        self.logfile.unlink(missing_ok=True)


def wait_released(settings: Settings, timeout: float = 10.0) -> None:
    """Waits until no walsender holds the slot: the server notices a client gone a moment
    after it went, and the next start (or the test's cleanup) needs the slot free."""
    deadline = time.monotonic() + timeout
    try:
        with psycopg.connect(settings.dsn, autocommit=True, connect_timeout=5) as conn:
            while slot_holder(conn, settings.slot) is not None:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
    except psycopg.OperationalError:
        return  # the server is down: nobody holds anything


def slot_holder(conn: Conn, slot: str) -> int | None:
    row = conn.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


# -- catching up ---------------------------------------------------------------------------


def write_sentinel(dsn: str) -> str:
    """Commits a sentinel row; returns its key text."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("INSERT INTO {} (token) VALUES (%s) RETURNING id").format(
                sql.Identifier(SENTINEL_TABLE)
            ),
            (f"sentinel-{time.time_ns()}",),
        ).fetchone()
    assert row is not None
    return str(row[0])


def catch_up(
    settings: Settings,
    timeout: float = 60.0,
    alive: Any = None,
    log: Callable[[], str] | None = None,
) -> None:
    """Waits until capture stored everything committed before this call.

    ``alive`` is a callable returning a failure text when the capture that should be
    catching up is gone (so a dead capture fails fast with its reason, not by timeout).
    A capture that is alive but stuck fails by timeout, saying what the database's
    sessions were doing and, given ``log``, the tail of what the capture logged: a rare
    hang on a busy CI machine must be diagnosable from its one failure.
    """
    key = write_sentinel(settings.dsn)
    deadline = time.monotonic() + timeout
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        changelog = ChangeLog(conn, settings.schema)
        after = 0
        while time.monotonic() < deadline:
            for stored in changelog.read(watch=SENTINEL_WATCH, after_id=after, limit=1000):
                after = stored.id
                if stored.event.key.get("id") == key:
                    return
            if alive is not None:
                problem = alive()
                if problem:
                    raise AssertionError(f"capture stopped while catching up: {problem}")
            time.sleep(0.05)
    said = f"\n-- its log:\n{log()[-4000:]}" if log is not None else ""
    raise AssertionError(
        f"capture did not store sentinel {key} within {timeout}s;"
        f" the database's sessions:\n{sessions(settings)}{said}"
    )


def sessions(settings: Settings) -> str:
    """What each session of the database is doing, and the locks it holds or waits for:
    the first thing to look at when capture stops moving. Bounded (a locked queue must not
    hang the report of a hang), and never raises: it is said on the way to a failure."""
    try:
        return _sessions(settings)
    except psycopg.Error as e:
        return f"(could not look: {e})"


def _sessions(settings: Settings) -> str:
    with psycopg.connect(settings.dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET statement_timeout = '5s'")
        rows = conn.execute(
            "SELECT a.pid, a.application_name, a.state, a.wait_event_type, a.wait_event,"
            " now() - a.backend_start, now() - a.xact_start, left(a.query, 160),"
            " (SELECT string_agg(l.locktype || ':' || l.mode || CASE WHEN l.granted"
            "   THEN '' ELSE ' (waiting)' END"
            "   || coalesce(':' || l.relation::regclass::text, ':' || l.objid::text, ''), ', ')"
            "  FROM pg_locks l WHERE l.pid = a.pid AND l.locktype <> 'virtualxid')"
            " FROM pg_stat_activity a WHERE a.datname = current_database()"
            " AND a.pid <> pg_backend_pid() ORDER BY a.backend_start"
        ).fetchall()
        lines = [" | ".join("" if v is None else str(v) for v in r) for r in rows]
        try:
            conn.execute("SET lock_timeout = '1s'")
            queued = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(
                    sql.Identifier(settings.schema, "trigger_queue")
                )
            ).fetchone()
            lines.append(f"trigger queue rows: {queued[0] if queued else '?'}")
        except psycopg.errors.LockNotAvailable:
            lines.append("trigger queue rows: (the queue is locked)")
    return "\n".join(lines)


def capture_problem(capture: app.Capture) -> str | None:
    """For ``catch_up(alive=...)`` with an in-process capture."""
    if capture.errors:
        return repr(capture.errors[0])
    if not all(t.is_alive() for t in capture.threads):
        return "a capture thread ended"
    return None


# -- reading the log ---------------------------------------------------------------------------


def stored_events(
    settings: Settings, watch: str | None = None, sentinels: bool = False
) -> list[ChangeEvent]:
    """Every event of the log (or of one watch) in log order, sentinels left out unless asked."""
    out: list[ChangeEvent] = []
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        changelog = ChangeLog(conn, settings.schema)
        after = 0
        while True:
            batch = changelog.read(watch=watch, after_id=after, limit=5000)
            if not batch:
                break
            after = batch[-1].id
            out.extend(s.event for s in batch if sentinels or s.event.watch != SENTINEL_WATCH)
    return out


def texts(image: RowImage | None) -> dict[str, Text] | None:
    return None if image is None else image.text_dict()


@dataclass(frozen=True)
class Row:
    """An event reduced to what a comparison needs."""

    table: str
    op: str
    key: tuple[tuple[str, Any], ...]
    new: tuple[tuple[str, Text], ...] | None
    old: tuple[tuple[str, Text], ...] | None = None


def _items(d: Mapping[str, Text] | None) -> tuple[tuple[str, Text], ...] | None:
    return None if d is None else tuple(sorted(d.items()))


def row_of(event: ChangeEvent, with_old: bool = False) -> Row:
    return Row(
        event.table,
        event.op,
        tuple(sorted(event.key.items())),
        _items(texts(event.new)),
        _items(texts(event.old)) if with_old else None,
    )


# -- raw text output of the tables -------------------------------------------------------------


def canonical_connect(dsn: str) -> Conn:
    """A session whose text output is byte-for-byte what the replication connection gets."""
    return psycopg.connect(dsn, autocommit=True, options=canonical_options())


def raw_rows(conn: Conn, query: sql.Composed, params: Sequence[Any] = ()) -> list[dict[str, Text]]:
    """Rows as PostgreSQL's text output, untouched by any loader."""
    cur = conn.execute(query, params)
    res = cur.pgresult
    assert res is not None and cur.description is not None
    names = [d.name for d in cur.description]
    out = []
    for r in range(res.ntuples):
        row: dict[str, Text] = {}
        for c, name in enumerate(names):
            raw = res.get_value(r, c)
            row[name] = None if raw is None else bytes(raw).decode("utf-8")
        out.append(row)
    return out


def table_contents(
    dsn: str, schema: str, table: str, key: Sequence[str]
) -> dict[tuple[Text, ...], dict[str, Text]]:
    with canonical_connect(dsn) as conn:
        rows = raw_rows(conn, sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, table)))
    return {tuple(r[k] for k in key): r for r in rows}


def replay(events: Iterable[ChangeEvent], table: str) -> dict[tuple[Text, ...], dict[str, Text]]:
    """The table as the log describes it: inserts, updates, deletes and truncates applied.

    An unchanged TOAST value the log could not fill keeps the value the model already had.
    """
    rows: dict[tuple[Text, ...], dict[str, Text]] = {}
    for e in events:
        if e.table != table:
            continue
        if e.op == "truncate":
            rows.clear()
            continue
        if e.op not in ("insert", "update", "delete", "read"):
            continue
        key = tuple(str(v) if v is not None else None for v in e.key.values())
        old_key_map = e.meta.get("old_key") if e.meta else None
        if e.op == "delete":
            assert key in rows, f"delete of a row the log never had: {e.event_id} {e.key}"
            del rows[key]
            continue
        assert e.new is not None
        new = dict(e.new.text_dict())
        if e.op == "update":
            prior_key = key
            if isinstance(old_key_map, Mapping):
                prior_key = tuple(old_key_map.values())
            previous = rows.pop(prior_key, None)
            assert previous is not None, f"update of a row the log never had: {e.event_id}"
            for name, value in list(new.items()):
                if value is UNCHANGED_TOAST:
                    new[name] = previous.get(name)
        else:
            assert key not in rows, f"insert of a row the log has already: {e.event_id} {e.key}"
        rows[key] = new
    return rows


def assert_replay_matches(
    dsn: str,
    events: Sequence[ChangeEvent],
    schema: str,
    table: str,
    key: Sequence[str],
) -> None:
    """Replaying the log must give the table's current contents, column by column.

    A column the table has and the replayed row lacks (added later and never written for
    that row) must be NULL; one the row has and the table lacks (dropped) is ignored.
    """
    model = replay(events, table)
    actual = table_contents(dsn, schema, table, key)
    assert sorted(model, key=repr) == sorted(actual, key=repr), (
        f"{table}: rows in the log but not in the table:"
        f" {sorted(set(model) - set(actual), key=repr)[:5]};"
        f" rows in the table but not in the log: {sorted(set(actual) - set(model), key=repr)[:5]}"
    )
    for k, row in actual.items():
        got = model[k]
        for column, value in row.items():
            assert got.get(column) == value, (
                f"{table} {k} column {column}: log gives {got.get(column)!r}, table has {value!r}"
            )


# -- the test_decoding truth -------------------------------------------------------------------


def create_truth_slot(dsn: str, slot: str) -> bool:
    """Creates a ``test_decoding`` slot; False where the server lacks the plugin."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
        except psycopg.errors.UndefinedFile:
            return False
    return True


def drop_slot(dsn: str, slot: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (slot,),
        )


@dataclass
class TruthChange:
    schema: str
    table: str
    op: str
    new: dict[str, Text] | None = None
    old: dict[str, Text] | None = None  # the old key (DEFAULT) or whole old row (FULL)
    flags: tuple[str, ...] = ()
    line: int = 0  # the output line it came from: one TRUNCATE line may name many tables


@dataclass
class TruthTxn:
    xid: int
    commit_time: str | None = None
    changes: list[TruthChange] = field(default_factory=list)


def truth(dsn: str, slot: str) -> list[TruthTxn]:
    """Every committed transaction since the slot was made, as ``test_decoding`` tells it."""
    out: list[TruthTxn] = []
    current: TruthTxn | None = None
    with canonical_connect(dsn) as conn:
        cur = conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'include-xids', '1',"
            " 'skip-empty-xacts', '1', 'include-timestamp', '1')",
            (slot,),
        )
        for number, (data,) in enumerate(cur):
            line = str(data)
            if line.startswith("BEGIN "):
                current = TruthTxn(int(line.split()[1]))
            elif line.startswith("COMMIT "):
                assert current is not None
                at = line.find("(at ")
                current.commit_time = line[at + 4 : -1] if at >= 0 else None
                out.append(current)
                current = None
            elif line.startswith("message: "):
                continue  # pgherald's own heartbeats and watermarks
            elif line.startswith("table "):
                assert current is not None, line
                for change in parse_change(line):
                    change.line = number
                    current.changes.append(change)
            else:
                raise AssertionError(f"unexpected test_decoding line: {line[:200]}")
    return out


def _identifier(text: str, i: int) -> tuple[str, int]:
    """An identifier as quote_identifier wrote it, starting at ``i``; (name, end)."""
    if text[i] == '"':
        j = i + 1
        parts = []
        while True:
            k = text.index('"', j)
            parts.append(text[j:k])
            if k + 1 < len(text) and text[k + 1] == '"':
                parts.append('"')
                j = k + 2
                continue
            return "".join(parts), k + 1
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] in "_$"):
        j += 1
    return text[i:j], j


def _value(text: str, i: int, type_name: str) -> tuple[Text, int]:
    """A value as test_decoding printed it, turned back into the type's text output."""
    if text.startswith("'", i):
        j = i + 1
        parts = []
        while True:
            k = text.index("'", j)
            parts.append(text[j:k])
            if k + 1 < len(text) and text[k + 1] == "'":
                parts.append("'")
                j = k + 2
                continue
            return "".join(parts), k + 1
    if text.startswith("B'", i):  # bit and bit varying
        k = text.index("'", i + 2)
        return text[i + 2 : k], k + 1
    j = text.find(" ", i)
    j = len(text) if j < 0 else j
    word = text[i:j]
    if word == "null":
        return None, j
    if word == "unchanged-toast-datum":
        return UNCHANGED_TOAST, j
    if type_name == "boolean":
        return {"true": "t", "false": "f"}[word], j
    return word, j


def _tuple(text: str, i: int) -> tuple[dict[str, Text], int]:
    """``name[type]:value ...`` up to a marker or the end."""
    values: dict[str, Text] = {}
    while i < len(text):
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text.startswith("new-tuple:", i):
            break
        name, i = _identifier(text, i)
        assert text[i] == "[", text[i:]
        end = text.index("]:", i)
        type_name = text[i + 1 : end]
        value, i = _value(text, end + 2, type_name)
        values[name] = value
    return values, i


def parse_change(line: str) -> list[TruthChange]:
    """One ``table s.t: OP: ...`` line; a TRUNCATE of several tables gives one per table."""
    i = len("table ")
    tables: list[tuple[str, str]] = []
    while True:
        schema, i = _identifier(line, i)
        assert line[i] == "."
        table, i = _identifier(line, i + 1)
        tables.append((schema, table))
        if line.startswith(", ", i):
            i += 2
            continue
        assert line.startswith(": ", i), line[i:]
        i += 2
        break
    op_end = line.index(":", i)
    op = line[i:op_end].lower()
    rest = line[op_end + 1 :].strip()
    if op == "truncate":
        flags = () if rest == "(no-flags)" else tuple(rest.split())
        return [TruthChange(s, t, op, flags=flags) for s, t in tables]
    (schema, table) = tables[0]
    if rest == "(no-tuple-data)":
        return [TruthChange(schema, table, op)]
    if op == "insert":
        return [TruthChange(schema, table, op, new=_tuple(rest, 0)[0])]
    if op == "delete":
        return [TruthChange(schema, table, op, old=_tuple(rest, 0)[0])]
    assert op == "update", line
    old: dict[str, Text] | None = None
    j = 0
    if rest.startswith("old-key:"):
        old, j = _tuple(rest, len("old-key:"))
        assert rest.startswith("new-tuple:", j), rest[j:]
        j += len("new-tuple:")
    return [TruthChange(schema, table, op, new=_tuple(rest, j)[0], old=old)]


def commit_time_text(when: datetime | None) -> str | None:
    """A commit time as ``timestamptz_to_str`` prints it under TimeZone=UTC."""
    if when is None:
        return None
    from datetime import UTC

    text = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "+00"


@dataclass(frozen=True)
class Watched:
    """How a table appears in the log: its watch's table name, key and replica identity."""

    table: str
    key: tuple[str, ...]
    full: bool = False


Step = tuple[int, str | None, Row]
"""(xid, commit time text, row) — one change in the order the log must hold it."""


def expected_steps(
    txns: Sequence[TruthTxn], watched: Mapping[tuple[str, str], Watched]
) -> list[Step]:
    """The truth as the log should hold it: watched tables only, unchanged TOAST filled from
    the row's previous version, and the old row as pgherald can know it (the whole row from
    REPLICA IDENTITY FULL, else the previous version of the row, else nothing)."""
    state: dict[tuple[str, tuple[Text, ...]], dict[str, Text]] = {}
    truncated: set[tuple[int, str]] = set()
    out: list[Step] = []
    for txn in txns:
        for ch in txn.changes:
            w = watched.get((ch.schema, ch.table))
            if w is None:
                continue
            if ch.op == "truncate":
                # A partitioned table's TRUNCATE names the parent and each partition; the
                # log holds one event for the watched parent.
                if (ch.line, w.table) in truncated:
                    continue
                truncated.add((ch.line, w.table))
                for k in [k for k in state if k[0] == w.table]:
                    del state[k]
                out.append((txn.xid, txn.commit_time, Row(w.table, "truncate", (), None, None)))
                continue
            if ch.op == "delete":
                assert ch.old is not None
                key = tuple(ch.old[k] for k in w.key)
                gone = state.pop((w.table, key), None)
                # test_decoding leaves NULLs out of old tuples: a column it omits is NULL.
                names = list(gone) if gone is not None else list(ch.old)
                old = {n: ch.old.get(n) for n in names} if w.full else {k: ch.old[k] for k in w.key}
                row = Row(w.table, "delete", tuple(zip(w.key, key, strict=True)), None, _items(old))
                out.append((txn.xid, txn.commit_time, row))
                continue
            assert ch.new is not None
            key = tuple(ch.new[k] for k in w.key)
            new = dict(ch.new)
            old_row: dict[str, Text] | None = None
            if ch.op == "update":
                old_key = key
                if ch.old is not None:
                    old_key = tuple(ch.old[k] for k in w.key)
                previous = state.pop((w.table, old_key), None)
                for name, value in new.items():
                    if value is UNCHANGED_TOAST and previous is not None and name in previous:
                        new[name] = previous[name]
                if w.full:
                    assert ch.old is not None
                    old_row = {n: ch.old.get(n) for n in new}
                elif old_key == key and previous is not None:
                    old_row = {n: previous.get(n, UNCHANGED_TOAST) for n in new}
            state[(w.table, key)] = new
            row = Row(
                w.table, ch.op, tuple(zip(w.key, key, strict=True)), _items(new), _items(old_row)
            )
            out.append((txn.xid, txn.commit_time, row))
    return out


def stored_steps(events: Iterable[ChangeEvent]) -> list[Step]:
    """The log in the same form as ``expected_steps`` (schema events left out)."""
    out: list[Step] = []
    for e in events:
        if e.op == "schema":
            continue
        old = texts(e.old) if e.op in ("update", "delete") else None
        if e.op == "truncate":
            row = Row(e.table, "truncate", (), None, None)
        else:
            row = Row(
                e.table,
                e.op,
                tuple(e.key.items()),
                _items(texts(e.new)),
                _items(old),
            )
        assert e.xid is not None
        out.append((e.xid, commit_time_text(e.commit_time), row))
    return out


def _short(value: Any) -> str:
    """A repr with long texts (TOAST values) cut, so a failure message stays readable."""
    text = repr(value)
    return re.sub(r"'([^']{40})[^']{20,}'", lambda m: f"'{m.group(1)}…'", text)


def assert_same_steps(stored: Sequence[Step], expected: Sequence[Step]) -> None:
    """Equal sequences, or an error that shows the first difference and the counts."""
    for i, (got, want) in enumerate(zip(stored, expected, strict=False)):
        if got != want:
            raise AssertionError(
                f"change {i} of {len(expected)} differs:\n  stored:   {_short(got)}\n"
                f"  expected: {_short(want)}"
            )
    if len(stored) != len(expected):
        extra = stored[len(expected) :] or expected[len(stored) :]
        which = "stored has extra" if len(stored) > len(expected) else "stored lacks"
        raise AssertionError(
            f"{len(stored)} changes stored, {len(expected)} expected;"
            f" {which}: {_short(list(extra)[:3])}"
        )
