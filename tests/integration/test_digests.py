"""Digests on real PostgreSQL and a real SMTP server: periods of an hour or a day in the
sink's time zone, snapshot runs, "nothing to send", retries and dead letters, late
changes, and that a digest goes out once across a crash and beside a second job."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from pgherald import admin, routing_admin, snapshots
from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.delivery.digests import DigestJob, DigestResult, window_of
from pgherald.delivery.engine import RetryPolicy
from pgherald.delivery.router import Router
from pgherald.events import ChangeEvent
from pgherald.render import Renderer
from pgherald.sinks.base import Outcome, SinkConfig
from pgherald.sinks.digest import Digest
from pgherald.sinks.email import EmailSink, from_config
from pgherald.store import deliveries
from pgherald.store.changelog import ChangeLog
from pgherald.store.deliveries import StoredSink
from tests import capture_harness as h
from tests.conftest import Database
from tests.integration.sink_events import change
from tests.integration.smtp_server import PASSWORD, USER, Cert, MailServer, make_cert, parts

FAST = RetryPolicy(base=60, maximum=60, jitter=0)
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("smtp-cert"))


@pytest.fixture
def server(cert: Cert) -> Iterator[MailServer]:
    s = MailServer(cert, "starttls").start()
    try:
        yield s
    finally:
        s.stop()


class Setup:
    def __init__(self, db: Database, server: MailServer, cert: Cert) -> None:
        db.execute("CREATE TABLE orders (id int PRIMARY KEY, name text, amount numeric)")
        self.settings: Settings = h.install(
            db.dsn, ["orders"], settings=h.settings_for(db.dsn, method="trigger"), slot=False
        )
        self.server, self.cert, self.seq = server, cert, 0

    def sink(self, name: str, watches: tuple[str, ...] = ("orders",), **extra: Any) -> EmailSink:
        opts: dict[str, Any] = {
            "host": "127.0.0.1", "port": self.server.port, "starttls": True,
            "ca_file": str(self.cert.cert), "username": USER, "password": PASSWORD,
            "from": "herald@example.org", "to": f"{name}@example.com", "helo": "pgherald.test",
            "mode": "digest", "timeout": 5,
        }  # fmt: skip
        opts.update(extra)
        sink = from_config(SinkConfig(name, "email", options=opts))
        with connect(self.settings) as conn:
            stored = StoredSink(name, "email", "pgherald", opts, False, 3, True)
            assert deliveries.add_sink(conn, self.settings.schema, stored)
            conn.commit()
        routing_admin.subscribe(self.settings, name, list(watches))
        return sink

    def stored(self, name: str) -> StoredSink:
        with connect(self.settings) as conn:
            sinks = deliveries.list_sinks(conn, self.settings.schema)
        return next(s for s in sinks if s.name == name)

    def job(self, *sinks: EmailSink | Any) -> DigestJob:
        return DigestJob(
            self.settings, {s.name: (s, self.stored(s.name)) for s in sinks}, policy=FAST
        )

    def log(self, *times: datetime, watch: str = "orders", name: str = "Zoë") -> None:
        """Changes committed at these times, into the log, then routed."""
        events: list[ChangeEvent] = []
        for t in times:
            self.seq += 1
            events.append(
                dataclasses.replace(change(self.seq, watch=watch, name=name), commit_time=t)
            )
        with connect(self.settings) as conn:
            ChangeLog(conn, self.settings.schema).append(events)
            conn.commit()
        self.route()

    def route(self) -> None:
        router = Router(self.settings)
        with connect(self.settings) as conn:
            while router.route_once(conn):
                pass

    def statuses(self, sink: str) -> dict[str, int]:
        with connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT status, count(*) FROM pgherald.deliveries WHERE sink = %s GROUP BY 1",
                (sink,),
            ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def attempts(self, sink: str) -> list[tuple[str, int]]:
        with connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT a.outcome, count(*) FROM pgherald.delivery_attempts a"
                " JOIN pgherald.deliveries d ON d.id = a.delivery_id WHERE d.sink = %s"
                " GROUP BY 1 ORDER BY 1",
                (sink,),
            ).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def mails(self, to: str) -> list[Any]:
        return [m for m in self.server.messages() if m["To"] == f"{to}@example.com"]


def once(job: DigestJob, now: datetime | None = None) -> list[tuple[str, str, int, str]]:
    results: list[DigestResult] = asyncio.run(job.run_once(now))
    return [(r.sink, r.key, r.changes, r.outcome) for r in results]


def hour_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def test_day_digests_in_the_sinks_time_zone(db: Database, server: MailServer, cert: Cert) -> None:
    s = Setup(db, server, cert)
    sink = s.sink("daily", timezone="Europe/Berlin", period="day")
    today = datetime.now(BERLIN).date()
    day1 = today - timedelta(days=3)
    day2 = today - timedelta(days=2)

    def at(day: Any, hour: int, minute: int = 0) -> datetime:
        return datetime(day.year, day.month, day.day, hour, minute, tzinfo=BERLIN)

    # 23:30 belongs to day 1 and 00:30 to day 2 in Berlin, though not in UTC.
    s.log(at(day1, 9), at(day1, 23, 30), at(day2, 0, 30), at(day2, 18))
    now = datetime.now(UTC)
    s.log(now)  # today's: its day is not over
    job = s.job(sink)
    assert once(job) == [
        ("daily", f"day:{day1.isoformat()}", 2, "sent"),
        ("daily", f"day:{day2.isoformat()}", 2, "sent"),
    ]
    assert once(job) == [], "each digest once"
    first, second = s.mails("daily")
    zone = at(day1, 12).strftime("%Z")
    assert first["Subject"] == f"[pgherald] orders: 2 changes ({day1.isoformat()} ({zone}))"
    assert second["X-Pgherald-Digest"] == f"day:{day2.isoformat()}"
    assert first["X-Pgherald-Digest"] == f"day:{day1.isoformat()}"
    text, html = parts(first)
    assert "\r\n2 changes: 2 added\r\n" in text
    assert text.count("orders: ID 1 added") == 2
    assert Renderer(timezone="Europe/Berlin").when(at(day1, 23, 30)) in text
    assert '<p class="pgh-summary">2 changes: 2 added</p>' in html
    assert s.statuses("daily") == {"delivered": 4, "pending": 1}
    assert s.attempts("daily") == [("delivered", 4)]

    _, end = window_of(now, "day", BERLIN)
    assert once(job, end + timedelta(seconds=59)) == [], "the period stays open a minute"
    assert once(job, end + timedelta(seconds=61)) == [
        ("daily", f"day:{datetime.now(BERLIN).date().isoformat()}", 1, "sent")
    ]
    assert s.statuses("daily") == {"delivered": 5}


def test_hour_digests_list_the_first_changes_and_count_the_rest(
    db: Database, server: MailServer, cert: Cert
) -> None:
    s = Setup(db, server, cert)
    sink = s.sink("hourly", period="hour", max_items=2)
    base = hour_start(datetime.now(UTC)) - timedelta(hours=3)
    s.log(*(base + timedelta(minutes=m) for m in (1, 2, 3, 4, 5)))  # 5 changes in hour -3
    s.log(base + timedelta(hours=2, minutes=30))  # 1 in hour -1; none in hour -2
    job = s.job(sink)
    assert once(job) == [
        ("hourly", f"hour:{base:%Y-%m-%dT%H:%M}+0000", 5, "sent"),
        ("hourly", f"hour:{base + timedelta(hours=2):%Y-%m-%dT%H:%M}+0000", 1, "sent"),
    ]
    busy = s.mails("hourly")[0]
    assert busy["X-Pgherald-Changes"] == "5"
    assert busy["Subject"].startswith("[pgherald] orders: 5 changes (")
    text, _ = parts(busy)
    assert text.count("orders: ID 1 added") == 2
    assert "… and 3 more changes not listed here." in text


def test_nothing_to_send_sends_nothing_unless_asked(
    db: Database, server: MailServer, cert: Cert
) -> None:
    s = Setup(db, server, cert)
    quiet = s.sink("quiet", period="hour")
    chatty = s.sink("chatty", period="hour", send_empty=True)
    job = s.job(quiet, chatty)
    created = s.stored("chatty").created_at
    assert created is not None
    assert once(job) == [], "no period ended since the sinks exist"
    h1 = hour_start(created) + timedelta(hours=1)
    assert once(job, h1 + timedelta(minutes=1, seconds=1)) == [
        ("chatty", f"hour:{h1 - timedelta(hours=1):%Y-%m-%dT%H:%M}+0000", 0, "sent")
    ]
    assert once(job, h1 + timedelta(minutes=2)) == [], "an empty digest once"
    # After a long pause, only the latest empty period is reported, not one per hour.
    assert once(job, h1 + timedelta(hours=5, minutes=2)) == [
        ("chatty", f"hour:{h1 + timedelta(hours=4):%Y-%m-%dT%H:%M}+0000", 0, "sent")
    ]
    (mail, _) = s.mails("chatty")
    assert mail["Subject"].startswith("[pgherald] orders: no changes (")
    text, html = parts(mail)
    assert "Nothing changed." in text and '<p class="pgh-summary">Nothing changed.</p>' in html
    assert s.mails("quiet") == []


def test_run_digests(db: Database, server: MailServer, cert: Cert) -> None:
    s = Setup(db, server, cert)
    db.execute("CREATE TABLE grants (id int PRIMARY KEY, amount numeric)")
    db.execute("INSERT INTO grants VALUES (1, 100), (2, 200)")
    admin.add_snapshot_watch(s.settings, None, table="grants")  # the baseline run
    every = s.sink("every_run", watches=("grants",), period="run", send_empty=True, delay=0)
    changed = s.sink("changed_runs", watches=("grants",), period="run", delay=0)
    job = s.job(every, changed)

    first = snapshots.run_watch(s.settings, "grants")  # nothing changed
    db.execute("INSERT INTO grants VALUES (3, 300); UPDATE grants SET amount = 150 WHERE id = 1")
    second = snapshots.run_watch(s.settings, "grants")
    assert (second.inserts, second.updates) == (1, 1)
    # The second run is not routed yet: its digest waits (it would be incomplete).
    assert once(job) == [("every_run", f"run:{first.run_id}", 0, "sent")]
    s.route()
    assert once(job) == [
        ("every_run", f"run:{second.run_id}", 2, "sent"),
        ("changed_runs", f"run:{second.run_id}", 2, "sent"),
    ]
    third = snapshots.run_watch(s.settings, "grants")
    s.route()
    assert once(job) == [("every_run", f"run:{third.run_id}", 0, "sent")]
    assert once(job) == []

    mail = s.mails("changed_runs")[0]
    assert mail["Subject"] == f"[pgherald] grants: 2 changes (run {second.run_id} of grants)"
    text, _ = parts(mail)
    assert f"Snapshot run {second.run_id} of grants, started " in text and "(ok)" in text
    assert "grants: ID 3 added" in text and "  Amount: 100 → 150" in text
    assert "snapshot comparison" in text
    assert [m["Subject"] for m in s.mails("every_run")] == [
        f"[pgherald] grants: no changes (run {first.run_id} of grants)",
        f"[pgherald] grants: 2 changes (run {second.run_id} of grants)",
        f"[pgherald] grants: no changes (run {third.run_id} of grants)",
    ]


def test_run_sinks_send_changes_without_runs_hourly(
    db: Database, server: MailServer, cert: Cert
) -> None:
    s = Setup(db, server, cert)
    sink = s.sink("runs", period="run")
    base = hour_start(datetime.now(UTC)) - timedelta(hours=2)
    s.log(base + timedelta(minutes=5), base + timedelta(minutes=6))
    assert once(s.job(sink)) == [("runs", f"hour:{base:%Y-%m-%dT%H:%M}+0000", 2, "sent")]


def test_retries_then_dead_letters_and_late_changes_go_to_the_next_period(
    db: Database, server: MailServer, cert: Cert
) -> None:
    s = Setup(db, server, cert)
    sink = s.sink("flaky", period="hour")  # max_attempts = 3
    base = hour_start(datetime.now(UTC)) - timedelta(hours=5)
    key = f"hour:{base:%Y-%m-%dT%H:%M}+0000"
    s.log(base + timedelta(minutes=1), base + timedelta(minutes=2))
    job = s.job(sink)
    server.data_reply = lambda text: "451 4.3.0 try again later"
    assert once(job) == [("flaky", key, 2, "retry")]
    assert s.statuses("flaky") == {"failed": 2}
    assert once(job) == [], "waits for its retry"
    later = datetime.now(UTC) + timedelta(minutes=2)
    server.data_reply = lambda text: None
    assert once(job, later) == [("flaky", key, 2, "sent")]
    assert s.statuses("flaky") == {"delivered": 2}
    assert s.attempts("flaky") == [("delivered", 2), ("retry", 2)]

    # A change of that hour that arrives after its digest went out joins the next hour.
    s.log(base + timedelta(minutes=30))
    assert once(job, later) == [
        ("flaky", f"hour:{base + timedelta(hours=1):%Y-%m-%dT%H:%M}+0000", 1, "sent")
    ]

    # A permanent refusal dead-letters the digest's changes at once, and the period is over.
    s.log(base + timedelta(hours=2, minutes=1))
    server.data_reply = lambda text: "554 5.7.1 refused by policy"
    assert once(job, later) == [
        ("flaky", f"hour:{base + timedelta(hours=2):%Y-%m-%dT%H:%M}+0000", 1, "dead")
    ]
    assert s.statuses("flaky") == {"delivered": 3, "dead": 1}
    assert once(job, later) == []


class Crash(BaseException):
    """The process dies here (nothing after it runs; the open transaction is rolled back)."""


class CrashingSink:
    """Wraps a sink: dies before or after the real send."""

    def __init__(self, sink: EmailSink, when: str) -> None:
        self.inner, self.when = sink, when
        self.name, self.digest = sink.name, sink.digest

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send_digest(self, digest: Digest) -> Outcome:
        if self.when == "before":
            raise Crash
        outcome = await self.inner.send_digest(digest)
        assert outcome is None
        raise Crash  # the mail server accepted it; the outcome is never recorded


def test_a_digest_goes_out_once_across_a_crash(
    db: Database, server: MailServer, cert: Cert
) -> None:
    s = Setup(db, server, cert)
    sink = s.sink("crashy", period="hour")
    base = hour_start(datetime.now(UTC)) - timedelta(hours=2)
    key = f"hour:{base:%Y-%m-%dT%H:%M}+0000"
    s.log(base + timedelta(minutes=1), base + timedelta(minutes=2))

    with pytest.raises(Crash):
        once(s.job(CrashingSink(sink, "before")))
    assert s.mails("crashy") == [] and s.statuses("crashy") == {"pending": 2}

    with pytest.raises(Crash):
        once(s.job(CrashingSink(sink, "after")))
    assert len(s.mails("crashy")) == 1
    assert s.statuses("crashy") == {"pending": 2}, "nothing recorded: it will be sent again"

    assert once(s.job(sink)) == [("crashy", key, 2, "sent")]
    assert once(s.job(sink)) == []
    sent, resent = s.mails("crashy")
    assert resent["Message-ID"] == sent["Message-ID"], "the copy is the same message"
    assert parts(resent)[0] == parts(sent)[0]
    assert s.statuses("crashy") == {"delivered": 2}
    assert s.attempts("crashy") == [("delivered", 2)]


def test_two_jobs_never_send_the_same_digest(db: Database, server: MailServer, cert: Cert) -> None:
    s = Setup(db, server, cert)
    sink = s.sink("shared", period="hour")
    base = hour_start(datetime.now(UTC)) - timedelta(hours=2)
    s.log(base + timedelta(minutes=1))
    other = s.job(sink)
    seen: list[list[tuple[str, str, int, str]]] = []

    class Meanwhile:
        name, digest = sink.name, sink.digest

        async def start(self) -> None:
            return None

        async def close(self) -> None:
            return None

        async def send_digest(self, digest: Digest) -> Outcome:
            # While this job holds the digest, another one (another process) finds nothing.
            seen.append(await asyncio.to_thread(once, other))
            return await sink.send_digest(digest)

    assert once(s.job(Meanwhile())) == [("shared", f"hour:{base:%Y-%m-%dT%H:%M}+0000", 1, "sent")]
    assert seen == [[]]
    assert once(other) == []
    assert len(s.mails("shared")) == 1
