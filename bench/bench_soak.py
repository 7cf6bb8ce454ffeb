"""A bounded soak: a real ``pgherald run`` daemon under a steady load for minutes.

What it proves, and how:

- **The daemon is the one operators run**: ``pgherald run --web HOST:PORT --http HOST:PORT``
  as a subprocess, on a throwaway cluster of the bench's own (``EmbeddedCluster``), with a
  logical watch on ``bench_rows`` delivered to two sinks: ``amqp`` (a durable fanout
  exchange of the run's own; the bench binds an exclusive queue to it and consumes it)
  and ``webhook`` (an HTTP receiver of the bench's). Both receivers run in processes of
  their own and are lean on purpose (a plain AMQP socket, a bare asyncio HTTP server), so
  that the instrument does not eat the 2-core machine it measures.
- **The load is paced**: ``pgbench --rate R`` (8 clients, one-row INSERT transactions) for
  the whole run, with its progress every 10 s; the achieved rate is printed, window by
  window and in all, so a rate the machine could not sustain is visible, not hidden.
- **The web console is used meanwhile**: a poller signs in (a user made for the run) and
  fetches the dashboard, the change browser and ``/metrics`` every few seconds; failed
  or slow pages are counted.
- **Every 10 s a sample**: the daemon's RSS and open file descriptors (``psutil``, its
  children included), its open connections to PostgreSQL (its TCP connections to the
  cluster's port), capture lag in bytes (``pg_replication_slots``: WAL written since the
  slot's confirmed position), deliveries not yet delivered per sink (``/metrics``,
  ``pgherald_deliveries_open``), and each receiver's commit-to-delivered p50/p99 over the
  window (arrival time minus the event's ``commit_time``, both clocks of this machine).
- **At the end**: the load stops, the bench waits until every delivery is delivered and
  both receivers have everything (or a timeout), then checks row by row that each
  committed row of ``bench_rows`` arrived at RabbitMQ and at the webhook exactly once by
  idempotency key (the event id): lost rows, duplicate deliveries of one key and rows that
  arrived under more than one key are counted separately. Then a table of the samples and
  a verdict: RSS growth from the first minute to the last (flat = less than 20 MB or
  less than 10 %), open connections and fds max - min, capture lag max, delivery kept up
  (each sink's commit-to-delivered median under 5 s in every window of the load's last
  minute), lost = 0. The exit status is 1 when anything was lost, delivery fell behind
  or the daemon died, else 0.

Run: ``.venv/bin/python bench/bench_soak.py [--minutes 10] [--rate 2000] [--poll-every 5]
[--drain-timeout 900] [--amqp-url URL]``. RabbitMQ must listen on 127.0.0.1:5672
(guest/guest), as for the sink tests, or give ``--amqp-url``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import _common as c
from bench.bench_delivery import FRAME_HEADER, Broker, LeanConsumer
from pgherald import routing_admin
from pgherald.web import accounts

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
PGHERALD = Path(sys.executable).with_name("pgherald")
CLIENTS = 8
SAMPLE_EVERY = 10.0
USER, PASSWORD = "soak", "soak-password-0123"
RSS_FLAT_BYTES = 20 << 20
RSS_FLAT_RATIO = 0.10
DELIVERY_BEHIND_MS = 5_000.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the receivers (each in a process of its own) --------------------------------------------


class Tally:
    """What a receiver got: per idempotency key its row id and how often it came, and the
    latencies of the arrivals since the last sample. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: dict[str, list[int]] = {}  # key -> [row id, times]
        self.window: list[float] = []
        self.arrived = 0

    def add(self, key: str, body: bytes, now: float) -> None:
        """One message or POST: an event, or (a webhook with ``batch``) an array of them,
        each then counted under its own event id (the POST's key is the batch's digest)."""
        data = json.loads(body)
        events = data if isinstance(data, list) else [data]
        with self.lock:
            for event in events:
                one = key if key and len(events) == 1 else str(event["event_id"])
                commit = datetime.fromisoformat(event["commit_time"]).timestamp()
                self.arrived += 1
                seen = self.keys.get(one)
                if seen is None:
                    self.keys[one] = [int(event["key"]["id"]), 1]
                else:
                    seen[1] += 1
                self.window.append((now - commit) * 1000)

    def sample(self) -> dict[str, Any]:
        with self.lock:
            window, self.window = self.window, []
            arrived = self.arrived
        return {
            "arrived": arrived,
            "n": len(window),
            "p50": percentile(window, 0.5),
            "p99": percentile(window, 0.99),
        }

    def dump(self, path: str) -> None:
        with self.lock:
            rows = [[k, r, n] for k, (r, n) in self.keys.items()]
        Path(path).write_text(json.dumps(rows))


def serve_commands(tally: Tally, stop: threading.Event) -> None:
    """stdin: ``sample`` answers one JSON line; ``dump PATH`` writes the keys and stops."""
    for line in sys.stdin:
        command = line.split()
        if command and command[0] == "sample":
            print(json.dumps(tally.sample()), flush=True)
        elif command and command[0] == "dump":
            tally.dump(command[1])
            print("dumped", flush=True)
            stop.set()  # only now: the receiver's process ends soon after
            return
    stop.set()


class TallyingConsumer(LeanConsumer):
    """``bench_delivery``'s lean AMQP consumer, tallying each message as it arrives (a
    10-minute run is over a million messages: their bodies are not kept)."""

    def consume(self, tally: Tally, stop: threading.Event) -> None:
        self.sock.settimeout(0.1)
        data = self.buffer
        while not stop.is_set():
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                break
            now = time.time()
            data += chunk
            at = 0
            while len(data) - at >= 7:
                kind, _, size = FRAME_HEADER.unpack_from(data, at)
                end = at + 7 + size + 1
                if end > len(data):
                    break
                if kind == 3:  # a body frame: one message (ours fit in one frame)
                    tally.add("", data[at + 7 : end - 1], now)
                at = end
            data = data[at:]


def amqp_main(url: str, exchange: str) -> None:
    consumer = TallyingConsumer(url, exchange)
    tally, stop = Tally(), threading.Event()
    threading.Thread(target=consumer.consume, args=(tally, stop), daemon=True).start()
    print("ready", flush=True)
    serve_commands(tally, stop)


def webhook_main() -> None:
    """A bare HTTP/1.1 server (keep-alive, Content-Length bodies), answering 200 to every
    POST; the key is the ``Idempotency-Key`` header."""
    tally, stop = Tally(), threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length, key = 0, ""
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    lowered = name.strip().lower()
                    if lowered == b"content-length":
                        length = int(value)
                    elif lowered == b"idempotency-key":
                        key = value.strip().decode()
                body = await reader.readexactly(length)
                tally.add(key, body, time.time())
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            return  # the bench is done: connections still open are dropped
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(f"ready {port}", flush=True)
        await asyncio.to_thread(stop.wait)  # until the bench says "dump"

    threading.Thread(target=serve_commands, args=(tally, stop), daemon=True).start()
    asyncio.run(main())


class ReceiverProcess:
    """The bench's side of a receiver process: start, sample, collect."""

    def __init__(self, name: str, *args: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.ready = self.proc.stdout.readline().split()
        if not self.ready or self.ready[0] != "ready":
            raise RuntimeError(f"the {name} receiver did not start")
        self._lock = threading.Lock()

    def _ask(self, line: str) -> str:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline()

    def sample(self) -> dict[str, Any]:
        return dict(json.loads(self._ask("sample")))

    def collect(self) -> list[tuple[str, int, int]]:
        """Stops the receiver; every (key, row id, times) it got."""
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        try:
            if self._ask(f"dump {path}").strip() != "dumped":
                raise RuntimeError(f"the {self.name} receiver did not dump its tally")
            return [(str(k), int(r), int(n)) for k, r, n in json.loads(Path(path).read_text())]
        finally:
            os.unlink(path)
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the daemon, the load, the console poller -------------------------------------------------


class DaemonProcess:
    """``pgherald run --web --http`` as a subprocess; its stderr to a file. With
    ``workers``, delivery runs apart, as docs/explanation/scaling.md describes: ``run
    --no-delivery`` captures and serves, and one ``pgherald deliver --sink NAME`` per name
    routes and delivers (each its own interpreter); all of them count as the daemon."""

    def __init__(self, dsn: str, web: int, http: int, workers: tuple[str, ...] = ()) -> None:
        self.log = Path(tempfile.mkstemp(prefix="pgherald-soak-", suffix=".log")[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGHERALD_"))}
        command = [str(PGHERALD), "--dsn", dsn, "--log-level", "warning", "run"]
        command += ["--web", f"127.0.0.1:{web}", "--http", f"127.0.0.1:{http}"]
        if workers:
            command.append("--no-delivery")
        self.procs: list[subprocess.Popen[bytes]] = []
        with self.log.open("w") as out:
            self.procs.append(subprocess.Popen(command, stdout=out, stderr=out, env=env))
            for sink in workers:
                deliver = [str(PGHERALD), "--dsn", dsn, "--log-level", "warning", "deliver"]
                deliver += ["--sink", sink]
                self.procs.append(subprocess.Popen(deliver, stdout=out, stderr=out, env=env))
        self.proc = self.procs[0]
        self.ps = [psutil.Process(p.pid) for p in self.procs]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def processes(self) -> list[psutil.Process]:
        return [q for p in self.ps for q in (p, *p.children(recursive=True))]

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes())

    def cpu(self) -> float:
        """CPU seconds used so far (user + system, its children included)."""
        return sum(sum(p.cpu_times()[:2]) for p in self.processes())

    def fds(self) -> int:
        return sum(p.num_fds() for p in self.processes())

    def pg_connections(self, port: int) -> int:
        return sum(
            1
            for p in self.processes()
            for conn in p.net_connections(kind="tcp")
            if conn.raddr and conn.raddr[1] == port and conn.status == psutil.CONN_ESTABLISHED
        )

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> int:
        """SIGTERM to all; the worst exit status."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return max(int(p.returncode) for p in self.procs)


PROGRESS = re.compile(r"progress: ([\d.]+) s, ([\d.]+) tps")


class Load:
    """``pgbench --rate`` for the run, its progress every 10 s read as it comes."""

    def __init__(self, db: c.BenchDB, rate: int, seconds: int) -> None:
        self.script = Path(tempfile.mkstemp(suffix=".sql")[1])
        self.script.write_text(c.INSERT_ONE + ";\n")
        command = [
            c.pg_tool(db.cluster, "pgbench"), "-n", "-f", str(self.script),
            "-c", str(CLIENTS), "-j", str(min(CLIENTS, os.cpu_count() or 1)),
            "-R", str(rate), "-T", str(seconds), "-P", str(int(SAMPLE_EVERY)),
            "-h", "127.0.0.1", "-p", str(db.cluster.port), "-U", db.cluster.superuser, db.name,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=c._client_env(),
        )
        self.progress: list[tuple[float, float]] = []  # (seconds into the run, tps)
        self.output: list[str] = []
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            found = PROGRESS.search(line)
            if found:
                self.progress.append((float(found[1]), float(found[2])))
            else:
                self.output.append(line)

    def last_tps(self) -> float:
        return self.progress[-1][1] if self.progress else float("nan")

    def wait(self) -> float:
        """Waits for the end; pgbench's own achieved tps."""
        out, _ = self.proc.communicate()
        self._thread.join(10)
        self.script.unlink(missing_ok=True)
        if self.proc.returncode != 0:
            raise RuntimeError(f"pgbench failed:\n{out}\n{''.join(self.output)}")
        for line in out.splitlines():
            if line.startswith("tps = "):
                return float(line.split()[2])
        raise RuntimeError(f"could not read pgbench's output:\n{out}")


@dataclass
class Poller:
    """Signs in to the console and fetches its pages (and ``/metrics``) every few seconds."""

    web: str
    http: str
    every: float
    fetched: int = 0
    failed: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def login(self, client: httpx.Client) -> None:
        page = client.get(f"{self.web}/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        if page.status_code != 200 or token is None:
            raise RuntimeError(f"no login form: {page.status_code}")
        form = {"name": USER, "password": PASSWORD, "csrf": token[1], "next": "/"}
        answer = client.post(f"{self.web}/login", data=form)
        if answer.status_code != 303:
            raise RuntimeError(f"could not sign in: {answer.status_code} {answer.text[:300]}")

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:  # the console may still be starting
                try:
                    self.login(client)
                    break
                except (httpx.HTTPError, RuntimeError) as e:
                    if time.monotonic() > deadline or self.stop.is_set():
                        self.failed.append(f"sign-in: {e!r}")
                        return
                    time.sleep(1.0)
            while not self.stop.wait(self.every):
                for url in (f"{self.web}/", f"{self.web}/changes", f"{self.http}/metrics"):
                    started = time.monotonic()
                    try:
                        response = client.get(url)
                        ok = response.status_code == 200 and "/login" not in str(response.url)
                        what = f"{url}: {response.status_code}"
                    except httpx.HTTPError as e:
                        ok, what = False, f"{url}: {type(e).__name__}"
                    self.times.append(time.monotonic() - started)
                    self.fetched += 1
                    if not ok:
                        self.failed.append(what)


def metric(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    out: dict[frozenset[tuple[str, str]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[frozenset(s.labels.items())] = s.value
    return out


# -- samples and the verdict -----------------------------------------------------------------


@dataclass
class Sample:
    at: float
    tps: float
    cpu: float  # the daemon's CPU seconds so far
    rss: int
    fds: int
    conns: int
    lag: int
    pending: dict[str, int]
    amqp: dict[str, Any]
    hook: dict[str, Any]


def take_sample(
    started: float,
    daemon: DaemonProcess,
    port: int,
    db: c.BenchDB,
    http: str,
    load: Load | None,
    receivers: dict[str, ReceiverProcess],
) -> Sample:
    with db.connect() as conn:
        row = conn.execute(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (db.settings.slot,),
        ).fetchone()
    lag = int(row[0]) if row else -1
    scrape = httpx.get(f"{http}/metrics", timeout=30).text
    pending: dict[str, int] = {"rabbit": 0, "hook": 0}
    for labels, v in metric(scrape, "pgherald_deliveries_open").items():
        sink = dict(labels).get("sink", "?")
        pending[sink] = pending.get(sink, 0) + int(v)
    return Sample(
        at=time.monotonic() - started,
        tps=load.last_tps() if load is not None else float("nan"),
        cpu=daemon.cpu(),
        rss=daemon.rss(),
        fds=daemon.fds(),
        conns=daemon.pg_connections(port),
        lag=lag,
        pending=pending,
        amqp=receivers["amqp"].sample(),
        hook=receivers["hook"].sample(),
    )


def row_line(s: Sample, before: Sample | None = None) -> str:
    busy = (s.cpu - before.cpu) / (s.at - before.at) if before else float("nan")
    return (
        f"{s.at:6.0f} {s.tps:7.0f} {busy:6.0%} {s.rss / 2**20:8.1f} {s.fds:5d} {s.conns:5d}"
        f" {s.lag / 1024:10.1f} {s.pending.get('rabbit', 0):8d} {s.pending.get('hook', 0):8d}"
        f" {s.amqp['p50']:9.1f} {s.amqp['p99']:9.1f} {s.hook['p50']:9.1f} {s.hook['p99']:9.1f}"
    )


HEADER = (
    f"{'t s':>6} {'tps':>7} {'cpu':>6} {'RSS MB':>8} {'fds':>5} {'conns':>5} {'lag kB':>10}"
    f" {'open mq':>8} {'open wh':>8} {'mq p50':>9} {'mq p99':>9} {'wh p50':>9} {'wh p99':>9}"
)


@dataclass(frozen=True)
class Check:
    lost: int
    duplicates: int  # deliveries of one key beyond the first
    rekeyed: int  # rows that arrived under more than one key
    unexpected: int  # arrivals of rows that were never committed


def check(committed: set[int], arrivals: list[tuple[str, int, int]]) -> Check:
    keys_of: dict[int, int] = {}
    duplicates = unexpected = 0
    for _, row, times in arrivals:
        keys_of[row] = keys_of.get(row, 0) + 1
        duplicates += times - 1
        if row not in committed:
            unexpected += 1
    lost = sum(1 for row in committed if row not in keys_of)
    rekeyed = sum(1 for n in keys_of.values() if n > 1)
    return Check(lost, duplicates, rekeyed, unexpected)


def minute_mean(samples: list[Sample], first: bool) -> float:
    end = samples[-1].at
    chosen = [s.rss for s in samples if (s.at <= 60 if first else s.at >= end - 60)]
    return sum(chosen) / len(chosen)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            c.say(f"  timed out after {timeout:.0f}s waiting for {what}")
            return False
        time.sleep(1)
    return True


# -- the run ---------------------------------------------------------------------------------


def soak(args: argparse.Namespace) -> int:
    seconds = int(args.minutes * 60)
    cluster = (
        c.start_cluster(shared_preload_libraries="pg_stat_statements")
        if args.pg_stats
        else c.start_cluster()
    )
    receivers: dict[str, ReceiverProcess] = {}
    daemon: DaemonProcess | None = None
    broker: Broker | None = None
    db: c.BenchDB | None = None
    try:
        db = c.bench_db(cluster, "soak")
        if args.pg_stats:
            with db.connect() as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
        exchange = f"pgherald-soak-{uuid.uuid4().hex[:8]}"
        broker = Broker(args.amqp_url, exchange, queue=False)  # the consumer binds its queue
        receivers["amqp"] = ReceiverProcess("amqp", "--consume-amqp", args.amqp_url, exchange)
        receivers["hook"] = ReceiverProcess("webhook", "--receive-webhook")
        hook_url = f"http://127.0.0.1:{receivers['hook'].ready[1]}/hook"
        routing_admin.add_sink(
            db.settings, "rabbit", "amqp", options={"url": args.amqp_url, "exchange": exchange}
        )
        hook_options: dict[str, Any] = {"url": hook_url, "batch": args.webhook_batch}
        routing_admin.add_sink(db.settings, "hook", "webhook", options=hook_options)
        routing_admin.subscribe(db.settings, "rabbit", [c.WATCH])
        routing_admin.subscribe(db.settings, "hook", [c.WATCH])
        accounts.add_user(db.settings, USER, PASSWORD, "admin")

        web_port, http_port = free_port(), free_port()
        web, http = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{http_port}"
        workers = ("rabbit", "hook") if args.workers else ()
        daemon = DaemonProcess(db.dsn, web_port, http_port, workers)

        def ready() -> bool:
            assert daemon is not None
            if not daemon.alive():
                raise RuntimeError(f"pgherald run ended:\n{daemon.tail()}")
            try:
                return httpx.get(f"{http}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        if not wait_until(ready, 90, "the daemon to be ready"):
            raise RuntimeError(f"pgherald run did not get ready:\n{daemon.tail()}")
        poller = Poller(web, http, args.poll_every)
        poll_thread = threading.Thread(target=poller.run, daemon=True)
        poll_thread.start()

        c.say(
            f"PostgreSQL {cluster.version}; pgherald run (pid {daemon.proc.pid}) --web :{web_port}"
            f" --http :{http_port}"
            f"{' --no-delivery, and one pgherald deliver --sink per sink' if workers else ''};"
            f" sinks amqp (RabbitMQ) and webhook; pgbench --rate"
            f" {args.rate} for {seconds}s ({CLIENTS} clients); webhook"
            f" {'batch = true' if args.webhook_batch else 'one POST per event'};"
            f" console polled every {args.poll_every:g}s"
        )
        c.say(HEADER)
        samples: list[Sample] = []
        started = time.monotonic()
        load = Load(db, args.rate, seconds)
        next_at = started + SAMPLE_EVERY
        while load.proc.poll() is None:
            time.sleep(max(0.0, min(1.0, next_at - time.monotonic())))
            if time.monotonic() >= next_at:
                next_at += SAMPLE_EVERY
                samples.append(
                    take_sample(started, daemon, cluster.port, db, http, load, receivers)
                )
                c.say(row_line(samples[-1], samples[-2] if len(samples) > 1 else None))
            if not daemon.alive():
                raise RuntimeError(f"pgherald run ended:\n{daemon.tail()}")
        achieved = load.wait()
        load_seconds = time.monotonic() - started
        committed_n = c.table_rows(db)
        c.say(
            f"load done: {committed_n:,} rows committed in {load_seconds:.0f}s, pgbench tps"
            f" {achieved:,.0f} (asked {args.rate:,}: {achieved / args.rate:.0%})"
        )

        # Drain: every delivery delivered and both receivers have at least one per row.
        def drained() -> bool:
            assert daemon is not None and db is not None
            if not daemon.alive():
                raise RuntimeError(f"pgherald run ended:\n{daemon.tail()}")
            with db.connect() as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status <> 'delivered'), count(*)"
                    " FROM pgherald.deliveries"
                ).fetchone()
            assert row is not None
            return bool(row[0] == 0 and row[1] >= 2 * committed_n)

        drain_started = time.monotonic()
        drain_ok = wait_until(drained, args.drain_timeout, "the deliveries to drain")
        drain_seconds = time.monotonic() - drain_started
        samples.append(take_sample(started, daemon, cluster.port, db, http, None, receivers))
        c.say(row_line(samples[-1], samples[-2]) + "  (after the drain)")
        time.sleep(1.0)  # the last confirmed messages reach the consumer
        poller.stop.set()
        poll_thread.join(60)

        with db.connect() as conn:
            committed = {int(r[0]) for r in conn.execute("SELECT id FROM public.bench_rows")}
            names = conn.execute(
                "SELECT application_name, count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid() GROUP BY 1 ORDER BY 1",
                (db.name,),
            ).fetchall()
        results = {name: check(committed, r.collect()) for name, r in receivers.items()}
        if args.pg_stats:
            print_statements(db)
        status = daemon.stop()
        return report(
            args, samples, results, len(committed), achieved, load_seconds, drain_ok,
            drain_seconds, poller, names, status,
        )  # fmt: skip
    finally:
        for r in receivers.values():
            r.close()
        if daemon is not None:
            daemon.stop()
            daemon.log.unlink(missing_ok=True)  # its tail is in any error raised above
        if broker is not None:
            with contextlib.suppress(Exception):
                broker.close()
        if db is not None:
            with contextlib.suppress(Exception):
                db.drop()
        cluster.stop()


def print_statements(db: c.BenchDB, top: int = 15) -> None:
    """The statements that took the server longest over the whole run
    (``pg_stat_statements``): where the database's share of the time went."""
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT calls, total_exec_time, mean_exec_time, rows,"
            " regexp_replace(query, '\\s+', ' ', 'g')"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database()) ORDER BY total_exec_time DESC LIMIT %s",
            (top,),
        ).fetchall()
    c.say("statements by the server's total time (pg_stat_statements):")
    c.say(f"{'calls':>9} {'total s':>8} {'mean ms':>8} {'rows':>9}  query")
    for calls, total, mean, n, text in rows:
        c.say(f"{calls:9,d} {total / 1000:8.1f} {mean:8.2f} {n:9,d}  {text[:110]}")


def report(
    args: argparse.Namespace,
    samples: list[Sample],
    results: dict[str, Check],
    committed: int,
    achieved: float,
    load_seconds: float,
    drain_ok: bool,
    drain_seconds: float,
    poller: Poller,
    names: list[Any],
    status: int,
) -> int:
    during = samples[:-1] or samples
    c.say("")
    c.say(
        "samples (every 10 s; cpu = the daemon's share of one core over the window;"
        " latencies in ms over the window, mq = RabbitMQ, wh = webhook):"
    )
    c.say(HEADER)
    for i, s in enumerate(during):
        c.say(row_line(s, during[i - 1] if i else None))
    if len(samples) > len(during):
        c.say(row_line(samples[-1], samples[-2]) + "  (after the drain)")
    first, last = minute_mean(during, True), minute_mean(during, False)
    growth = last - first
    flat = growth < RSS_FLAT_BYTES or growth < RSS_FLAT_RATIO * first
    conns = [s.conns for s in during]
    fds = [s.fds for s in during]
    lag_max = max(s.lag for s in during)
    open_max = max(sum(s.pending.values()) for s in during)
    rates = [s.tps for s in during if s.tps == s.tps]
    c.say("")
    c.say(
        f"load: asked {args.rate:,} tx/s for {args.minutes:g} min; pgbench achieved"
        f" {achieved:,.0f} tx/s ({committed:,} rows in {load_seconds:.0f}s; per 10 s window"
        f" {min(rates, default=0):,.0f}-{max(rates, default=0):,.0f})"
        + ("" if achieved >= 0.97 * args.rate else "  ** the asked rate was NOT sustained **")
    )
    c.say(
        f"RSS: first minute {first / 2**20:.1f} MB, last minute {last / 2**20:.1f} MB, growth"
        f" {growth / 2**20:+.1f} MB ({growth / first:+.1%}) [flat = < 20 MB or < 10 %:"
        f" {'flat' if flat else 'GROWING'}]"
    )
    c.say(
        f"PostgreSQL connections: {min(conns)}-{max(conns)} (max - min {max(conns) - min(conns)});"
        f" fds {min(fds)}-{max(fds)} (max - min {max(fds) - min(fds)}); at the end by name: "
        + ", ".join(f"{n or '-'} {k}" for n, k in names)
    )
    spent = samples[-1].cpu
    c.say(
        f"daemon CPU: {spent:.0f}s for {committed:,} rows (two deliveries each),"
        f" {spent / max(committed, 1) * 1e6:.0f} us per row; mean"
        f" {spent / max(samples[-1].at, 1):.0%} of one core"
    )
    c.say(
        f"capture lag max {lag_max / 1024:,.1f} kB; open deliveries max {open_max:,};"
        f" drain after the load {'took' if drain_ok else 'TIMED OUT after'} {drain_seconds:.0f}s"
    )
    c.say(
        f"console: {poller.fetched} pages fetched, {len(poller.failed)} failed"
        + (f" ({poller.failed[:3]})" if poller.failed else "")
        + f", p50 {percentile(poller.times, 0.5) * 1000:.0f} ms, max"
        f" {max(poller.times, default=0) * 1000:.0f} ms"
    )
    lost = 0
    for name, r in results.items():
        lost += r.lost
        c.say(
            f"{name}: {committed:,} committed rows; lost {r.lost}, duplicate deliveries"
            f" {r.duplicates}, rows under more than one key {r.rekeyed}, never-committed"
            f" rows {r.unexpected}"
        )
    # Delivery kept up when, over the load's last minute, each sink's commit-to-delivered
    # median stayed under DELIVERY_BEHIND_MS: a backlog that grew and was not worked off
    # by the end is a delivery lag that is not bounded, whatever the capture lag says.
    final = [x for x in during if x.at > during[-1].at - 60] or during
    worst = max(max(x.amqp["p50"], x.hook["p50"]) for x in final)
    kept_up = worst < DELIVERY_BEHIND_MS
    c.say(
        f"delivery over the load's last minute: worst window p50 {worst:,.0f} ms"
        f" [kept up = < {DELIVERY_BEHIND_MS:,.0f} ms: {'yes' if kept_up else 'NO, BEHIND'}]"
    )
    verdict = (
        "ok"
        if lost == 0 and flat and kept_up and drain_ok and status == 0
        else "NOT OK" + (f" (lost {lost})" if lost else "")
    )
    c.say(
        f"verdict: lost {lost}; RSS {'flat' if flat else 'growing'}; connections max - min"
        f" {max(conns) - min(conns)}; capture lag max {lag_max / 1024:,.1f} kB; delivery"
        f" {'kept up' if kept_up else 'behind'}; daemon exit {status} -> {verdict}"
    )
    return 1 if lost or status != 0 or not drain_ok or not kept_up else 0


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--consume-amqp":
        amqp_main(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) == 2 and sys.argv[1] == "--receive-webhook":
        webhook_main()
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--poll-every", type=float, default=5.0, help="console poll, seconds")
    parser.add_argument("--drain-timeout", type=float, default=900.0)
    parser.add_argument("--amqp-url", default=DEFAULT_URL)
    parser.add_argument(
        "--webhook-batch",
        action="store_true",
        help="the webhook sink posts each batch as one JSON array (option batch = true)"
        " instead of one POST per event",
    )
    parser.add_argument(
        "--pg-stats",
        action="store_true",
        help="load pg_stat_statements in the cluster and print the statements that took the"
        " server longest",
    )
    parser.add_argument(
        "--workers",
        action="store_true",
        help="deliver in one `pgherald deliver --sink NAME` process per sink beside"
        " `pgherald run --no-delivery` (docs/explanation/scaling.md) instead of in the daemon",
    )
    args = parser.parse_args()
    sys.exit(soak(args))


if __name__ == "__main__":
    main()
