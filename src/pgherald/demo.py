"""``pgherald demo``: the embedded default, and pgherald's showcase.

It starts a throwaway PostgreSQL (the system's server when installed, else the one the
``pgserver`` wheel ships), creates a small finance schema (employees, projects, grants),
watches it with logical capture, runs a steady workload of inserts, updates and deletes,
some of them rolled back, and prints each change as the change log records it. Ctrl-C
(or ``--duration``) stops it and removes the server and its files.

``--journal FILE`` writes what the workload committed, one JSON line per transaction,
so a test can compare what was printed with the truth.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import psycopg

from pgherald import admin, app, present
from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster, find_binaries
from pgherald.events import ChangeEvent
from pgherald.store.changelog import ChangeLog
from pgherald.web.changes_server import ChangesServer

SCHEMA_SQL = """
CREATE TABLE employees (
    id serial PRIMARY KEY,
    first_name text NOT NULL,
    last_name text NOT NULL,
    department text NOT NULL,
    salary numeric(10, 2) NOT NULL,
    active boolean NOT NULL DEFAULT true,
    hired_on date NOT NULL DEFAULT current_date
);
ALTER TABLE employees REPLICA IDENTITY FULL;
CREATE TABLE projects (
    id serial PRIMARY KEY,
    code text NOT NULL UNIQUE,
    title text NOT NULL,
    budget numeric(12, 2) NOT NULL,
    status text NOT NULL DEFAULT 'planned',
    lead_id int REFERENCES employees (id) ON DELETE SET NULL
);
CREATE TABLE grants (
    id serial PRIMARY KEY,
    project_id int NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    funder text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    starts date NOT NULL,
    ends date NOT NULL
);
"""

FIRST = [
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "Ken",
    "Radia",
    "Niklaus",
]
LAST = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Allen",
    "Thompson",
    "Perlman",
]
DEPARTMENTS = ["Finance", "Research", "Operations", "Legal", "Engineering"]
FUNDERS = ["NSF", "ERC", "Wellcome", "Gates Foundation", "DFG", "NIH"]
ROLLED_BACK = "ROLLED-BACK"  # a marker that must never appear in the output

Op = tuple[str, str, dict[str, Any]]  # (table, operation, key)


@dataclass
class Workload:
    """A steady mix of finance-style changes; knows exactly what it committed."""

    conn: psycopg.Connection[Any]
    rng: random.Random
    journal: TextIO | None = None
    committed: list[Op] = field(default_factory=list)
    rolled_back: int = 0

    def _ids(self, table: str) -> list[int]:
        query = {
            "employees": "SELECT id FROM employees",
            "projects": "SELECT id FROM projects",
            "grants": "SELECT id FROM grants",
        }[table]
        return [int(r[0]) for r in self.conn.execute(query).fetchall()]

    def hire(self, ops: list[Op], last: str | None = None) -> None:
        row = self.conn.execute(
            "INSERT INTO employees (first_name, last_name, department, salary)"
            " VALUES (%s, %s, %s, %s) RETURNING id",
            (
                self.rng.choice(FIRST),
                last or self.rng.choice(LAST),
                self.rng.choice(DEPARTMENTS),
                Decimal(self.rng.randrange(40_000, 120_000, 500)),
            ),
        ).fetchone()
        assert row is not None
        ops.append(("employees", "insert", {"id": str(row[0])}))

    def raise_salary(self, ops: list[Op]) -> None:
        ids = self._ids("employees")
        if not ids:
            return self.hire(ops)
        emp = self.rng.choice(ids)
        self.conn.execute(
            "UPDATE employees SET salary = round(salary * 1.05, 2) WHERE id = %s", (emp,)
        )
        ops.append(("employees", "update", {"id": str(emp)}))

    def transfer(self, ops: list[Op]) -> None:
        ids = self._ids("employees")
        if not ids:
            return self.hire(ops)
        emp = self.rng.choice(ids)
        self.conn.execute(
            "UPDATE employees SET department = %s, active = NOT active WHERE id = %s",
            (self.rng.choice(DEPARTMENTS), emp),
        )
        ops.append(("employees", "update", {"id": str(emp)}))

    def leave(self, ops: list[Op]) -> None:
        ids = self._ids("employees")
        if len(ids) < 5:
            return self.hire(ops)
        emp = self.rng.choice(ids)
        # ON DELETE SET NULL updates the projects this employee led: those are changes too.
        led = [
            int(r[0])
            for r in self.conn.execute(
                "SELECT id FROM projects WHERE lead_id = %s ORDER BY id", (emp,)
            ).fetchall()
        ]
        self.conn.execute("DELETE FROM employees WHERE id = %s", (emp,))
        ops.extend(("projects", "update", {"id": str(p)}) for p in led)
        ops.append(("employees", "delete", {"id": str(emp)}))

    def new_project(self, ops: list[Op]) -> None:
        leads = self._ids("employees")
        code = f"P-{self.rng.randrange(10_000, 99_999)}"
        row = self.conn.execute(
            "INSERT INTO projects (code, title, budget, lead_id) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (code) DO NOTHING RETURNING id",
            (
                code,
                f"Study {self.rng.randrange(1, 500)}",
                Decimal(self.rng.randrange(10_000, 900_000)),
                self.rng.choice(leads) if leads else None,
            ),
        ).fetchone()
        if row is not None:
            ops.append(("projects", "insert", {"id": str(row[0])}))

    def rebudget(self, ops: list[Op]) -> None:
        ids = self._ids("projects")
        if not ids:
            return self.new_project(ops)
        proj = self.rng.choice(ids)
        self.conn.execute(
            "UPDATE projects SET budget = budget + %s, status = %s WHERE id = %s",
            (
                Decimal(self.rng.randrange(-5_000, 20_000)),
                self.rng.choice(["planned", "active", "on hold", "closed"]),
                proj,
            ),
        )
        ops.append(("projects", "update", {"id": str(proj)}))

    def award(self, ops: list[Op]) -> None:
        projects = self._ids("projects")
        if not projects:
            return self.new_project(ops)
        start = date(2026, 1, 1) + timedelta(days=self.rng.randrange(0, 365))
        row = self.conn.execute(
            "INSERT INTO grants (project_id, funder, amount, starts, ends)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (
                self.rng.choice(projects),
                self.rng.choice(FUNDERS),
                Decimal(self.rng.randrange(5_000, 250_000)),
                start,
                start + timedelta(days=365),
            ),
        ).fetchone()
        assert row is not None
        ops.append(("grants", "insert", {"id": str(row[0])}))

    def extend_or_cancel(self, ops: list[Op]) -> None:
        ids = self._ids("grants")
        if not ids:
            return self.award(ops)
        grant = self.rng.choice(ids)
        if self.rng.random() < 0.7:
            self.conn.execute("UPDATE grants SET ends = ends + 90 WHERE id = %s", (grant,))
            ops.append(("grants", "update", {"id": str(grant)}))
        else:
            self.conn.execute("DELETE FROM grants WHERE id = %s", (grant,))
            ops.append(("grants", "delete", {"id": str(grant)}))

    def step(self) -> None:
        """One transaction: one to three changes; about one in eight is rolled back."""
        actions: list[Callable[[list[Op]], None]] = [
            self.hire,
            self.raise_salary,
            self.raise_salary,
            self.transfer,
            self.leave,
            self.new_project,
            self.rebudget,
            self.award,
            self.extend_or_cancel,
        ]
        ops: list[Op] = []
        roll_back = self.rng.random() < 0.125
        with self.conn.transaction() as tx:
            for _ in range(self.rng.randint(1, 3)):
                self.rng.choice(actions)(ops)
            if self.rng.random() < 0.1:
                # A savepoint that is rolled back: its change must never be seen.
                try:
                    with self.conn.transaction():
                        self.hire([], last=ROLLED_BACK)
                        raise _Undo
                except _Undo:
                    pass
            if roll_back:
                self.hire(ops, last=ROLLED_BACK)
                raise psycopg.Rollback(tx)
        if roll_back:
            self.rolled_back += 1
            return
        self.committed.extend(ops)
        if self.journal is not None:
            self.journal.write(json.dumps([list(op) for op in ops]) + "\n")
            self.journal.flush()


class _Undo(Exception):
    pass


def describe(event: ChangeEvent) -> str:
    """The demo's line: local time, aligned columns, inserted rows' fields, NULL as (empty)."""
    return present.describe(
        event, stamp="time", aligned=True, null="(empty)", show_inserts=True, width=100
    )


def _console_and_feed(settings: Settings, port: int, out: TextIO) -> tuple[Any, app.Delivery]:
    """The web console, a demo user, and an Atom feed of every change, with their URLs.

    The feed is a subscription of a feed sink, so it rides on routing and delivery as a
    real deployment's would; the password is made up now and shown once.
    """
    import secrets

    from pgherald import feeds, routing_admin
    from pgherald.web import accounts
    from pgherald.web.server import Server

    password = secrets.token_urlsafe(12)
    accounts.add_user(settings, "demo", password, "admin")
    routing_admin.add_sink(settings, "demo-feed", "feed", options={"title": "Finance changes"})
    routing_admin.subscribe(settings, "demo-feed", ["employees", "projects", "grants"])
    delivery = app.Delivery(settings).start()
    try:
        console = Server(settings, port=port + 1).start()
    except OSError:  # the port is taken: any free one will do
        console = Server(settings, port=0).start()
    token = feeds.feed_token(settings, "demo-feed")
    print(
        f"pgherald demo: web console at {console.url} (user demo, password {password})",
        file=out,
        flush=True,
    )
    print(f"pgherald demo: Atom feed at {console.url}feeds/{token}.atom", file=out, flush=True)
    return console, delivery


def main(
    duration: float | None = None,
    rate: float = 4.0,
    seed: int | None = None,
    journal: Path | None = None,
    out: TextIO = sys.stdout,
    port: int = 8765,
) -> int:
    """Runs the demo; returns the process exit code."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = signal.signal(signal.SIGINT, on_signal)
    previous_term = signal.signal(signal.SIGTERM, on_signal)
    binaries = find_binaries()
    print(
        f"pgherald demo: starting a throwaway PostgreSQL {binaries.version} …", file=out, flush=True
    )
    cluster = EmbeddedCluster(binaries).start()
    journal_file = journal.open("w") if journal is not None else None
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE herald_demo")
        settings = Settings(dsn=cluster.dsn("herald_demo"), batch_interval=0.05)
        with psycopg.connect(settings.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA_SQL.encode())
        admin.init(settings)
        for table in ("public.employees", "public.projects", "public.grants"):
            admin.add_watch(settings, table)
        print(
            f"pgherald demo: PostgreSQL on port {cluster.port}; watching employees, projects and"
            " grants with logical capture. Ctrl-C stops.",
            file=out,
            flush=True,
        )
        capture = app.Capture(settings).start()
        capture.wait_ready()
        try:
            server = ChangesServer(settings.dsn, settings.schema, port=port).start()
        except OSError:  # the port is taken: any free one will do
            server = ChangesServer(settings.dsn, settings.schema, port=0).start()
        print(f"pgherald demo: serving the changes at {server.url}", file=out, flush=True)
        console, delivery = _console_and_feed(settings, port, out)
        rng = random.Random(seed)
        work_conn = psycopg.connect(settings.dsn, autocommit=True)
        workload = Workload(work_conn, rng, journal_file)
        reader_conn = psycopg.connect(settings.dsn, autocommit=True)
        changelog = ChangeLog(reader_conn, settings.schema)
        shown = 0
        last_id = 0
        deadline = time.monotonic() + duration if duration is not None else None
        next_step = time.monotonic()
        while not stop.is_set() and not capture.stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now >= next_step:
                workload.step()
                next_step = now + rng.expovariate(rate)
            for stored in changelog.read(after_id=last_id, limit=500):
                last_id = stored.id
                print(describe(stored.event), file=out, flush=True)
                shown += 1
            stop.wait(min(0.1, max(0.0, next_step - time.monotonic())))
        # Let capture catch up with everything committed before stopping it.
        settle = time.monotonic() + 10
        while shown < len(workload.committed) and time.monotonic() < settle and not capture.errors:
            for stored in changelog.read(after_id=last_id, limit=500):
                last_id = stored.id
                print(describe(stored.event), file=out, flush=True)
                shown += 1
            time.sleep(0.1)
        server.stop()
        console.stop()
        delivery.close()
        work_conn.close()
        reader_conn.close()
        capture.close()
        print(
            f"pgherald demo: {len(workload.committed)} changes committed"
            f" ({workload.rolled_back} transactions rolled back), {shown} captured and shown.",
            file=out,
            flush=True,
        )
        return 0
    finally:
        if journal_file is not None:
            journal_file.close()
        cluster.stop()
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
