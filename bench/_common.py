"""What the logical-capture benchmarks share: a throwaway cluster, a watched table, workloads,
pgherald capturing in-process, and the references measured in the same run.

Every figure depends on the machine and on whatever else runs on it (this is a shared
2-core machine), so each benchmark measures a reference in the same run, repeats both,
and prints medians and the ratio of the medians.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

from pgherald import admin, app
from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.sources.logical import parse_lsn

TABLE = "bench_rows"  # written out in the SQL below
WATCH = "bench_rows"
REF_SLOT = "bench_reference"

CREATE_TABLE = """
CREATE TABLE public.bench_rows (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    flag boolean NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
)
"""

INSERT_ONE = (
    "INSERT INTO public.bench_rows (name, amount, flag)"
    " VALUES ('customer-' || (random() * 1000)::int || '@example.com',"
    " round((random() * 10000)::numeric, 2), random() < 0.5)"
)

# Server-side: one transaction per row, without a client round trip per row, so a big
# backlog is made in seconds. The WAL it leaves is what a busy application leaves.
SINGLE_ROW_TRANSACTIONS = (
    """
DO $$
BEGIN
    FOR i IN 1..%s LOOP
        """
    + INSERT_ONE
    + """;
        COMMIT;
    END LOOP;
END
$$
"""
)

ONE_TRANSACTION = """
INSERT INTO public.bench_rows (name, amount, flag)
SELECT 'customer-' || (i %% 1000) || '@example.com', (i %% 100000) / 100.0, i %% 2 = 0
FROM generate_series(1, %s) AS i
"""


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def say(text: str) -> None:
    print(text, flush=True)


def start_cluster(**settings: str) -> EmbeddedCluster:
    """A cluster of our own (system PostgreSQL, else pgserver's), removed at exit."""
    cluster = EmbeddedCluster(settings=settings or None)
    cluster.start()
    return cluster


@dataclass
class BenchDB:
    """A fresh database with pgherald installed and one watched table.

    Each repetition gets its own, so that the change log and the table start empty every
    time and no repetition pays for an earlier one's data.
    """

    cluster: EmbeddedCluster
    name: str
    settings: Settings

    @property
    def dsn(self) -> str:
        return self.settings.dsn

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)

    def wal_lsn(self) -> int:
        with self.connect() as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        return parse_lsn(str(row[0]))

    def create_reference_slot(self) -> None:
        with self.connect() as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (REF_SLOT,))

    def drop(self) -> None:
        """Drops the slots (they would keep WAL) and the database."""
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as conn:
            for _ in range(100):
                busy = conn.execute(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = %s AND active",
                    (self.name,),
                ).fetchone()
                if busy is None or busy[0] == 0:
                    break
                time.sleep(0.1)
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = %s",
                (self.name,),
            )
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(self.name)))


def bench_db(cluster: EmbeddedCluster, name: str, **overrides: Any) -> BenchDB:
    """Creates database ``name`` with the table, pgherald's store, a watch and its slot."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    settings = Settings(dsn=cluster.dsn(name), **overrides)
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(CREATE_TABLE)
    admin.init(settings)
    admin.add_watch(settings, ("public", TABLE), name=WATCH)
    # Newer versions create the slot in add_watch; ensure_slot is harmless either way.
    ensure_slot = getattr(admin, "ensure_slot", None) or getattr(app, "ensure_slot")  # noqa: B009
    ensure_slot(settings)
    return BenchDB(cluster, name, settings)


def run_workload(db: BenchDB, statement: str, rows: int) -> float:
    """Runs a workload statement for ``rows`` rows; returns its seconds.

    ``synchronous_commit = off``: the WAL (and so the backlog) is the same, it is only
    made faster.
    """
    with db.connect() as conn:
        conn.execute("SET synchronous_commit = off")
        started = time.perf_counter()
        conn.execute(statement % int(rows))  # an integer we made: no user input
        return time.perf_counter() - started


# -- pgherald capturing in-process -----------------------------------------------------


class Capturing:
    """pgherald's logical capture of ``db`` in a thread, as ``pgherald run`` does it.

    ``stored()`` is the number of events committed to the change log so far, which the
    sink counts after each commit, so polling it costs no query.
    """

    def __init__(
        self,
        db: BenchDB,
        source: Any = None,
        source_name: str | None = None,
        thread_name: str = "pgherald-capture",
    ) -> None:
        """Logical capture by default; ``source`` (with its checkpoint's ``source_name``)
        runs another, such as trigger capture."""
        self.db = db
        self.source: Any = source if source is not None else app.build_logical_source(db.settings)
        self.sink = app.ChangeLogSink(
            db.settings.dsn,
            db.settings.schema,
            source_name or app.logical_source_name(db.settings),
        )
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _run(self) -> None:
        try:
            self.source.run(self.sink, self.stop)
        except BaseException as e:
            self.errors.append(e)
            self.stop.set()

    def start(self) -> Capturing:
        self.thread.start()
        return self

    def stored(self) -> int:
        if self.errors:
            raise RuntimeError(f"capture failed: {self.errors[0]!r}") from self.errors[0]
        return self.sink.stored_events

    def wait_stored(self, count: int, timeout: float = 600.0) -> float:
        """Waits until ``count`` events are stored; returns the monotonic time it happened."""
        deadline = time.monotonic() + timeout
        while self.stored() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.stored()} of {count} events stored in time")
            time.sleep(0.002)
        return time.perf_counter()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        self.sink.close()
        if self.errors:
            raise RuntimeError(f"capture failed: {self.errors[0]!r}") from self.errors[0]


@contextmanager
def capturing(db: BenchDB) -> Iterator[Capturing]:
    capture = Capturing(db).start()
    try:
        yield capture
    finally:
        capture.close()


def drain_pgherald(db: BenchDB, expected: int) -> float:
    """Seconds from starting capture until ``expected`` events are stored (committed)."""
    started = time.perf_counter()
    with capturing(db) as capture:
        done = capture.wait_stored(expected)
    return done - started


class CpuMeter:
    """CPU seconds (user + system) spent by the cluster's processes and by this thread.

    The server's share is the postmaster's own time, its live children's, and that of the
    children it already reaped (a backend that disconnected, a parallel worker), which
    the kernel adds to the postmaster's ``children`` times. On a shared machine CPU time
    moves less with the load than wall time does."""

    def __init__(
        self, cluster: EmbeddedCluster, client: Callable[[], float] = time.thread_time
    ) -> None:
        pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        self.postmaster = psutil.Process(pid)
        self._client = client

    def server(self) -> float:
        t = self.postmaster.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.postmaster.children(recursive=True):
            try:
                ct = child.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += ct.user + ct.system
        return float(total)

    def client(self) -> float:
        """By default this thread's: the run's, without an RSS sampler's thread (5 ms apart,
        it costs about 1% of a core, more the longer a loaded machine makes the run);
        ``time.process_time`` where the work runs in threads of its own (capture)."""
        return self._client()

    @contextmanager
    def measuring(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        server, client = self.server(), self.client()
        try:
            yield out
        finally:
            time.sleep(0.2)  # let the postmaster reap a backend that just disconnected
            out["server"] = self.server() - server
            out["client"] = self.client() - client


# -- references --------------------------------------------------------------------------


def pg_tool(cluster: EmbeddedCluster, name: str) -> str:
    """A client program of the cluster's own installation (else the one on PATH)."""
    own = Path(cluster.binaries.tool(name))
    if own.exists():
        return str(own)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the PostgreSQL client programs")
    return found


def drain_pg_recvlogical(db: BenchDB, end_lsn: int, slot: str = REF_SLOT) -> float:
    """Seconds ``pg_recvlogical`` takes to receive the slot's backlog up to ``end_lsn``.

    ``--endpos`` makes it exit once it has received everything up to there; it decodes
    nothing and writes to /dev/null, so this is the server's decoding and sending rate.
    """
    endpos = f"{end_lsn >> 32:X}/{end_lsn & 0xFFFFFFFF:X}"
    command = [
        pg_tool(db.cluster, "pg_recvlogical"),
        "--dbname",
        db.dsn,
        "--slot",
        slot,
        "--start",
        "--no-loop",
        f"--endpos={endpos}",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={db.settings.publication}",
        "-f",
        "/dev/null",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=_client_env())
    return time.perf_counter() - started


def _client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


@contextmanager
def pg_recvlogical_attached(db: BenchDB, slot: str = REF_SLOT) -> Iterator[None]:
    """``pg_recvlogical`` streaming ``slot`` to /dev/null for the duration of the block."""
    command = [
        pg_tool(db.cluster, "pg_recvlogical"),
        "--dbname",
        db.dsn,
        "--slot",
        slot,
        "--start",
        "--no-loop",
        "--status-interval=1",
        "-o",
        "proto_version=1",
        "-o",
        f"publication_names={db.settings.publication}",
        "-f",
        "/dev/null",
    ]
    proc = subprocess.Popen(command, env=_client_env(), stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


@dataclass(frozen=True)
class PgbenchResult:
    tps: float
    transactions: int


def pgbench(
    db: BenchDB,
    script: str,
    *,
    clients: int,
    seconds: float,
    rate: float | None = None,
    options: Mapping[str, str] | None = None,
) -> PgbenchResult:
    """Runs pgbench with a custom ``script`` (no vacuum, no initialisation) on ``db``."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script + ";\n")
        path = f.name
    try:
        command = [
            pg_tool(db.cluster, "pgbench"),
            "-n",
            "-f",
            path,
            "-c",
            str(clients),
            "-j",
            str(min(clients, os.cpu_count() or 1)),
            "-T",
            str(int(seconds)),
            "-h",
            "127.0.0.1",
            "-p",
            str(db.cluster.port),
            "-U",
            db.cluster.superuser,
            db.name,
        ]
        if rate is not None:
            command[1:1] = ["-R", str(int(rate))]
        env = _client_env()
        if options:
            env["PGOPTIONS"] = " ".join(f"-c {k}={v}" for k, v in options.items())
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    finally:
        os.unlink(path)
    tps = transactions = 0.0
    for line in out.splitlines():
        if line.startswith("tps = "):
            tps = float(line.split()[2])
        elif line.startswith("number of transactions actually processed:"):
            transactions = float(line.split(":")[1].split("/")[0])
    if not tps:
        raise RuntimeError(f"could not read pgbench's output:\n{out}")
    return PgbenchResult(tps, int(transactions))


def table_rows(db: BenchDB) -> int:
    with db.connect() as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE)))
        found = row.fetchone()
    assert found is not None
    return int(found[0])
