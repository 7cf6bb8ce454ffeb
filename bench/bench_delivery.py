"""End to end: logical capture -> change log -> router -> delivery engine -> RabbitMQ.

pgherald runs in-process as ``pgherald run`` wires it (``LogicalSource`` + ``ChangeLogSink``,
the ``Router`` and the ``DeliveryEngine`` with default settings) and delivers to an
``amqp`` sink: a durable fanout exchange of the run's own, persistent mandatory
messages, publisher confirms. The bench binds a queue of its own to the exchange.

**Throughput.** A fresh database per repetition gets pgherald's slot and a reference slot
on the same publication; then N one-row transactions are committed while nobody reads
(``SINGLE_ROW_TRANSACTIONS``, as ``bench_logical_throughput`` makes them). pgherald
drains its slot all the way: events/s = N / seconds from starting pgherald until the
bench's queue holds N messages *and* the engine has recorded N deliveries as delivered
(a delivery counts once the broker confirmed it). The queue's depth is read with a
passive declare every few milliseconds, so counting costs no CPU per message. The
reference: ``pg_recvlogical`` draining the reference slot's identical backlog to
/dev/null; the order of the two alternates between repetitions. Target: >= 20,000
events/s.

**Latency.** ``pgbench --rate 2000`` (8 clients, one-row INSERT transactions) runs for a
while and pgherald captures and delivers it. A consumer in a process of its own (so
that neither steals the other's interpreter lock) receives every message and notes the
wall clock when it arrived; latency = arrival - the event's ``commit_time`` in the body
(pgoutput's commit timestamp, taken by the server's clock on this same machine). The
first seconds are left out. The reference, in the same run on the same workload:
``pg_recvlogical`` on a second slot (``test_decoding`` with ``include-timestamp``,
written to a pipe that the bench reads line by line): commit-to-received of each COMMIT
line, what the server and the transport cost before pgherald does anything. Targets:
p50 <= 15 ms, p99 <= 75 ms.

Run: ``.venv/bin/python bench/bench_delivery.py [--part throughput|latency|both]
[--rows 100000] [--rate 2000] [--seconds 15] [--repeat 3] [--durable-queue]``.
RabbitMQ must listen on 127.0.0.1:5672 (guest/guest), as for the sink tests
(``.ci/services``), or give ``--amqp-url``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import aio_pika
import aio_pika.abc
import pamqp.exceptions
import pamqp.frame
import psutil
from pamqp import commands

from bench import _common as c
from pgherald import app, routing_admin
from pgherald.db.embedded import EmbeddedCluster
from pgherald.db.types import TypeRegistry
from pgherald.sinks.amqp import AmqpSink
from pgherald.sinks.base import make_message
from pgherald.store.changelog import ChangeLog, StoredEvent

TARGET_RATE = 20_000
TARGET_P50_MS = 15.0
TARGET_P99_MS = 75.0
WARM_UP_S = 2.0
CLIENTS = 8
SINK = "rabbit"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
TD_SLOT = "bench_reference_td"
FRAME_HEADER = struct.Struct(">BHI")  # type, channel, size
PGHERALD = Path(sys.executable).with_name("pgherald")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- RabbitMQ: the exchange and the bench's queue --------------------------------------------


class Broker:
    """The bench's side of RabbitMQ, on an event loop in a thread of its own: declares the
    run's exchange and a queue bound to it, and reads the queue's depth on request."""

    def __init__(self, url: str, exchange: str, queue: bool, durable_queue: bool = False) -> None:
        self.url = url
        self.exchange = exchange
        self.queue = f"{exchange}-q" if queue else ""
        self.durable_queue = durable_queue
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._call(self._open())

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _open(self) -> None:
        self._connection = await aio_pika.connect(self.url, timeout=10)
        self._channel = channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        if not self.queue:
            return
        queue = await channel.declare_queue(
            self.queue, durable=self.durable_queue, auto_delete=False
        )
        await queue.bind(exchange)

    async def _depth(self) -> int:
        assert self._channel is not None
        queue = await self._channel.declare_queue(self.queue, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0)

    def depth(self) -> int:
        return int(self._call(self._depth()))

    async def _close(self) -> None:
        assert self._channel is not None and self._connection is not None
        with contextlib.suppress(Exception):
            if self.queue:
                await self._channel.queue_delete(self.queue)
            await self._channel.exchange_delete(self.exchange)
        await self._connection.close()

    def close(self) -> None:
        try:
            self._call(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


# -- pgherald end to end ---------------------------------------------------------------------


def add_amqp_sink(db: c.BenchDB, url: str, exchange: str) -> None:
    routing_admin.add_sink(
        db.settings, SINK, "amqp", options={"url": url, "exchange": exchange}, format="pgherald"
    )
    routing_admin.subscribe(db.settings, SINK, [c.WATCH])


class Pipeline:
    """pgherald capturing, routing and delivering in this process, as ``pgherald run``
    does; each stage's progress is readable without a query.

    ``split``: routing and delivery in a process of their own (``pgherald deliver``, as
    the docs suggest for workers apart from capture), so that they do not share capture's
    interpreter lock; their progress is then read from the store.
    """

    def __init__(self, db: c.BenchDB, split: bool = False) -> None:
        self.db = db
        self.capture = c.Capturing(db)
        self.delivery: app.Delivery | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.conn: Any = None
        if not split:
            self.delivery = app.Delivery(db.settings, stop=self.capture.stop)

    def start(self) -> Pipeline:
        self.capture.start()
        if self.delivery is not None:
            self.delivery.start()
        else:
            command = [str(PGHERALD), "deliver", "--dsn", self.db.dsn, "--log-level", "warning"]
            self.worker = subprocess.Popen(command, env=c._client_env())
            self.conn = self.db.connect()
        return self

    def wait_ready(self) -> None:
        if self.delivery is not None:
            self.delivery.wait_ready()
            return
        deadline = time.monotonic() + 30
        wanted = {"pgherald-router", f"pgherald-deliver-{SINK}"}
        while not wanted <= {
            str(r[0])
            for r in self.conn.execute("SELECT application_name FROM pg_stat_activity").fetchall()
        }:
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError("pgherald deliver did not start")
            time.sleep(0.05)

    def check(self) -> None:
        self.capture.stored()  # raises if capture failed
        if self.delivery is not None and self.delivery.errors:
            raise RuntimeError(f"delivery failed: {self.delivery.errors[0]!r}")
        if self.worker is not None and self.worker.poll() is not None:
            raise RuntimeError(f"pgherald deliver ended with {self.worker.returncode}")

    @property
    def poll(self) -> float:
        """Seconds between looks at the progress (a query each when split)."""
        return 0.005 if self.delivery is not None else 0.02

    def stored(self) -> int:
        return self.capture.stored()

    def routed(self) -> int:
        if self.delivery is not None:
            return self.delivery.router.routed_events
        row = self.conn.execute(
            "SELECT position::bigint FROM pgherald.checkpoints WHERE source = 'router'"
        ).fetchone()
        return int(row[0]) if row else 0  # log ids of a fresh database count from 1

    def delivered(self) -> int:
        if self.delivery is not None:
            return self.delivery.engine.stats[SINK].delivered
        row = self.conn.execute(
            "SELECT count(*) FROM pgherald.deliveries WHERE status = 'delivered'"
        ).fetchone()
        return int(row[0])

    def close(self) -> None:
        try:
            if self.delivery is not None:
                self.delivery.close(timeout=30)
            if self.worker is not None:
                self.worker.terminate()
                self.worker.wait(60)
            if self.conn is not None:
                self.conn.close()
        finally:
            self.capture.close()


@contextlib.contextmanager
def pipeline(db: c.BenchDB, split: bool = False) -> Iterator[Pipeline]:
    running = Pipeline(db, split).start()
    try:
        yield running
    finally:
        running.close()


@dataclass
class Drained:
    seconds: float
    stored_at: float
    routed_at: float
    in_queue: int


def drain_pgherald(db: c.BenchDB, broker: Broker, rows: int, split: bool = False) -> Drained:
    """Seconds from starting pgherald until ``rows`` messages are in the bench's queue and
    recorded as delivered; also when capture had stored them and the router routed them."""
    started = time.perf_counter()
    stored_at = routed_at = 0.0
    deadline = time.monotonic() + 900
    with pipeline(db, split) as running:
        while True:
            running.check()
            now = time.perf_counter()
            if not stored_at and running.stored() >= rows:
                stored_at = now
            if not routed_at and running.routed() >= rows:
                routed_at = now
            if running.delivered() >= rows and broker.depth() >= rows:
                done = time.perf_counter()
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"stored {running.stored()}, routed {running.routed()},"
                    f" delivered {running.delivered()}, queue {broker.depth()} of {rows}"
                )
            time.sleep(running.poll)
    return Drained(done - started, stored_at - started, routed_at - started, broker.depth())


@dataclass
class Alone:
    """The amqp sink alone: the same events already encoded, published in the engine's
    batches with confirms and nothing else running; and RabbitMQ's CPU for them."""

    rate: float
    broker_us: float
    """RabbitMQ's CPU per message (µs), all its threads."""
    publisher_us: float
    """This process's CPU per message (µs): framing, writing, confirms."""


def _broker_process() -> psutil.Process | None:
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "beam.smp" and "rabbit" in cmdline:
            return proc
    return None


def sink_alone(db: c.BenchDB, url: str, batch_size: int = 500) -> Alone:
    """How fast the amqp sink and RabbitMQ alone take the log's events: what end to end
    delivery can at best reach on this machine, whatever capture, routing and the engine's
    bookkeeping cost. The messages are made first (not timed), then sent as the engine
    sends them: a batch, its confirms awaited, the next batch."""
    with db.connect() as conn:
        loader = TypeRegistry.load(conn)
        stored: list[StoredEvent] = []
        log = ChangeLog(conn, db.settings.schema)
        while True:
            got = log.read(after_id=stored[-1].id if stored else 0, limit=5000, loader=loader)
            if not got:
                break
            stored.extend(got)
    messages = [make_message(s.event, s.id, "pgherald", "pgherald") for s in stored]
    exchange = f"pgherald-bench-alone-{uuid.uuid4().hex[:8]}"
    broker = Broker(url, exchange, queue=True)
    rabbit = _broker_process()

    async def publish() -> tuple[float, float, float]:
        sink = AmqpSink("alone", exchange, url=url)
        await sink.start()
        try:
            me = psutil.Process()
            cpu0 = rabbit.cpu_times() if rabbit else None
            mine0 = me.cpu_times()
            started = time.perf_counter()
            for i in range(0, len(messages), batch_size):
                outcomes = await sink.send(messages[i : i + batch_size])
                assert all(o is None for o in outcomes), outcomes[:3]
            took = time.perf_counter() - started
            mine1 = me.cpu_times()
            cpu1 = rabbit.cpu_times() if rabbit else None
            broker_s = (
                (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system) if cpu0 and cpu1 else 0.0
            )
            mine_s = (mine1.user + mine1.system) - (mine0.user + mine0.system)
            return took, broker_s, mine_s
        finally:
            await sink.close()

    try:
        took, broker_s, mine_s = asyncio.run(publish())
        assert broker.depth() == len(messages), (broker.depth(), len(messages))
    finally:
        broker.close()
    n = len(messages)
    return Alone(n / took, broker_s / n * 1e6, mine_s / n * 1e6)


def throughput(cluster: EmbeddedCluster, args: argparse.Namespace) -> tuple[float, float, float]:
    rows = args.rows
    ours: list[float] = []
    theirs: list[float] = []
    sink_rates: list[float] = []
    for rep in range(args.repeat):
        db = c.bench_db(cluster, f"delivery_tp_{rep}")
        exchange = f"pgherald-bench-{uuid.uuid4().hex[:8]}"
        broker = Broker(args.amqp_url, exchange, queue=True, durable_queue=args.durable_queue)
        try:
            add_amqp_sink(db, args.amqp_url, exchange)
            db.create_reference_slot()
            made = c.run_workload(db, c.SINGLE_ROW_TRANSACTIONS, rows)
            end = db.wal_lsn()
            if rep % 2 == 0:
                t_ref = c.drain_pg_recvlogical(db, end)
                drained = drain_pgherald(db, broker, rows, args.split)
            else:
                drained = drain_pgherald(db, broker, rows, args.split)
                t_ref = c.drain_pg_recvlogical(db, end)
            with db.connect() as conn:
                found = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*)"
                    " FROM pgherald.deliveries"
                ).fetchone()
            assert found is not None and found[0] == found[1] == rows, found
            alone = sink_alone(db, args.amqp_url)
        finally:
            broker.close()
            db.drop()
        ours.append(rows / drained.seconds)
        theirs.append(rows / t_ref)
        extra = drained.in_queue - rows
        c.say(
            f"  throughput #{rep + 1}: workload {made:5.1f}s | pg_recvlogical"
            f" {rows / t_ref:9,.0f} events/s | pgherald in RabbitMQ {rows / drained.seconds:9,.0f}"
            f" events/s ({drained.seconds:.2f}s; stored by {drained.stored_at:.2f}s, routed by"
            f" {drained.routed_at:.2f}s{f'; {extra} duplicates' if extra else ''})"
            f" | ratio {t_ref / drained.seconds:.2f}"
        )
        c.say(
            f"    the amqp sink alone on the same {rows:,} events: {alone.rate:,.0f} events/s"
            f" (RabbitMQ {alone.broker_us:.0f} µs CPU per message, the publisher"
            f" {alone.publisher_us:.0f} µs)"
        )
        sink_rates.append(alone.rate)
    rate, ref = c.median(ours), c.median(theirs)
    ratio = c.median([o / t for o, t in zip(ours, theirs, strict=True)])
    verdict = "ok" if rate >= TARGET_RATE else "BELOW TARGET"
    c.say(
        f"throughput ({rows:,} one-row transactions, median of {args.repeat}): pgherald"
        f" {rate:,.0f} events/s confirmed in RabbitMQ, pg_recvlogical {ref:,.0f} events/s,"
        f" median ratio {ratio:.2f}  [target >= {TARGET_RATE:,} events/s: {verdict}]"
    )
    c.say(
        f"the amqp sink and RabbitMQ alone (median of {args.repeat}): {c.median(sink_rates):,.0f}"
        " events/s, the ceiling of delivery to RabbitMQ on this machine"
    )
    return rate, ref, ratio


# -- latency ---------------------------------------------------------------------------------


class LeanConsumer:
    """A plain AMQP 0-9-1 consumer on a blocking socket: its own exclusive queue bound to
    the exchange, ``no_ack``; each message's arrival time noted.

    Written out rather than with aio-pika because the measuring instrument must not eat
    the machine it measures: aio-pika's consumer costs ~85 us of CPU per message (aiormq's
    ~60), a fifth of a core at 2,000 messages/s on a 2-core machine that is already busy;
    this one parses a frame header per frame and keeps the body of each message, a few us.
    pamqp encodes and decodes the handshake; frames that carry a delivery are only split.
    """

    def __init__(self, url: str, exchange: str) -> None:
        parsed = urlsplit(url)
        self.sock = socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.arrivals: list[tuple[float, bytes]] = []
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self._expect(commands.Connection.Start)
        user, password = unquote(parsed.username or "guest"), unquote(parsed.password or "guest")
        self._send(0, commands.Connection.StartOk(response=f"\x00{user}\x00{password}"))
        tune = self._expect(commands.Connection.Tune)
        self._send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        self._send(0, commands.Connection.Open(virtual_host=unquote(parsed.path[1:] or "/")))
        self._expect(commands.Connection.OpenOk)
        self._send(1, commands.Channel.Open())
        self._expect(commands.Channel.OpenOk)
        self._send(1, commands.Queue.Declare(exclusive=True))
        queue = self._expect(commands.Queue.DeclareOk).queue
        self._send(1, commands.Queue.Bind(queue=queue, exchange=exchange))
        self._expect(commands.Queue.BindOk)
        self._send(1, commands.Basic.Consume(queue=queue, no_ack=True))
        self._expect(commands.Basic.ConsumeOk)

    def _send(self, channel: int, frame: Any) -> None:
        self.sock.sendall(pamqp.frame.marshal(frame, channel))

    def _expect(self, kind: type[Any]) -> Any:
        while True:
            try:
                used, _, frame = pamqp.frame.unmarshal(self.buffer)
            except pamqp.exceptions.UnmarshalingException:
                used = 0
            if used:
                self.buffer = self.buffer[used:]
                if isinstance(frame, kind):
                    return frame
                raise RuntimeError(f"the broker answered {frame!r}, not {kind.__name__}")
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("the broker closed the connection")
            self.buffer += data

    def run(self, stop: threading.Event) -> None:
        """Receives until ``stop``: a body frame (type 3) is a message (ours fit in one)."""
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
                if kind == 3:
                    self.arrivals.append((now, data[at + 7 : end - 1]))
                at = end
            data = data[at:]


def consumer_main(url: str, exchange: str) -> None:
    """The latency consumer (a process of its own, so that it does not share pgherald's
    interpreter lock): prints "ready" once its queue is bound, and on a line on stdin prints
    ``[[arrival, commit_time], ...]`` as JSON and exits."""
    consumer = LeanConsumer(url, exchange)
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    print("ready", flush=True)
    consumer.run(stop)
    out = [[t, json.loads(body)["commit_time"]] for t, body in consumer.arrivals]
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def latencies_ms(pairs: list[tuple[float, str]]) -> list[float]:
    """Arrival minus commit time, without the first WARM_UP_S seconds of commits."""
    measured = [(datetime.fromisoformat(commit).timestamp(), arrival) for arrival, commit in pairs]
    if not measured:
        return []
    first = min(commit for commit, _ in measured)
    return [
        (arrival - commit) * 1000 for commit, arrival in measured if commit >= first + WARM_UP_S
    ]


def pgherald_latency(
    db: c.BenchDB, url: str, exchange: str, rate: int, seconds: int, split: bool = False
) -> tuple[float, float, float, int]:
    """(p50 ms, p99 ms, achieved tps, messages) of commit-to-consumer."""
    consumer = subprocess.Popen(
        [sys.executable, __file__, "--consume", url, exchange],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert consumer.stdout is not None and consumer.stdin is not None
        if consumer.stdout.readline().strip() != "ready":
            raise RuntimeError("the consumer did not start")
        with pipeline(db, split) as running:
            deadline = time.monotonic() + 30
            while not running.capture.source.connected.wait(0.05):
                running.check()
                if time.monotonic() > deadline:
                    raise TimeoutError("capture did not start")
            running.wait_ready()
            result = c.pgbench(db, c.INSERT_ONE, clients=CLIENTS, seconds=seconds, rate=rate)
            expected = c.table_rows(db)
            deadline = time.monotonic() + 120
            while running.delivered() < expected:
                running.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {running.delivered()} of {expected} delivered")
                time.sleep(running.poll)
        time.sleep(0.2)  # the last confirmed messages reach the consumer
        consumer.stdin.write("stop\n")
        consumer.stdin.flush()
        pairs = json.loads(consumer.stdout.readline())
        consumer.wait(30)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    got = latencies_ms([(float(a), str(t)) for a, t in pairs])
    if len(pairs) < expected:
        raise RuntimeError(f"the consumer got {len(pairs)} of {expected} messages")
    return percentile(got, 0.5), percentile(got, 0.99), result.tps, len(pairs)


def reference_latency(db: c.BenchDB, rate: int, seconds: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, achieved tps) of commit-to-received by ``pg_recvlogical``."""
    with db.connect() as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (TD_SLOT,))
    command = [
        c.pg_tool(db.cluster, "pg_recvlogical"),
        "--dbname",
        db.dsn,
        "--slot",
        TD_SLOT,
        "--start",
        "--no-loop",
        "--status-interval=1",
        "-o",
        "include-timestamp=on",
        "-o",
        "skip-empty-xacts=on",
        "-f",
        "-",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    latencies: list[tuple[float, float]] = []  # (commit, ms)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b"COMMIT"):
                now = time.time()
                at = line.rfind(b"(at ")
                if at >= 0:
                    commit = datetime.fromisoformat(line[at + 4 :].rstrip(b")\n").decode())
                    ts = commit.timestamp()
                    latencies.append((ts, (now - ts) * 1000))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        result = c.pgbench(db, c.INSERT_ONE, clients=CLIENTS, seconds=seconds, rate=rate)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        thread.join(10)
    if not latencies:
        raise RuntimeError("pg_recvlogical received nothing")
    first = min(t for t, _ in latencies)
    measured = [ms for t, ms in latencies if t >= first + WARM_UP_S]
    return percentile(measured, 0.5), percentile(measured, 0.99), result.tps


STAGES = """
WITH d AS (
    SELECT e.commit_time AS c,
           e.captured_at AS captured,
           pg_xact_commit_timestamp(e.xmin) AS stored,
           d.created_at AS routing,
           a.attempted_at AS recording,
           pg_xact_commit_timestamp(a.xmin) AS recorded
    FROM pgherald.events e
    JOIN pgherald.deliveries d ON d.event_id = e.id
    JOIN pgherald.delivery_attempts a ON a.delivery_id = d.id
    WHERE e.op = 'insert' AND e.commit_time > (SELECT min(commit_time) + interval '2 s'
                                                FROM pgherald.events WHERE op = 'insert')
)
SELECT stage,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
FROM d, LATERAL (VALUES
    (1, 'captured (read from the slot)', extract(epoch FROM captured - c) * 1000),
    (2, 'stored (the change log committed)', extract(epoch FROM stored - c) * 1000),
    (3, 'routing began (its transaction)', extract(epoch FROM routing - c) * 1000),
    (4, 'recording began (sent and confirmed)', extract(epoch FROM recording - c) * 1000),
    (5, 'recorded (the outcome committed)', extract(epoch FROM recorded - c) * 1000)
) AS v(n, stage, ms)
GROUP BY n, stage ORDER BY n
"""


def print_stages(db: c.BenchDB) -> None:
    """Where an event's time goes, stage by stage: ms after its commit, from the store's own
    timestamps (the cluster has track_commit_timestamp on)."""
    with db.connect() as conn:
        rows = conn.execute(STAGES).fetchall()
    for stage, p50, p99 in rows:
        c.say(f"    {stage:<40} p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")


def latency(cluster: EmbeddedCluster, args: argparse.Namespace) -> None:
    ours: list[tuple[float, float, float, int]] = []
    theirs: list[tuple[float, float, float]] = []
    for rep in range(args.repeat):
        db = c.bench_db(cluster, f"delivery_lat_{rep}")
        exchange = f"pgherald-bench-{uuid.uuid4().hex[:8]}"
        broker = Broker(args.amqp_url, exchange, queue=False)  # the consumer has its queue
        try:
            add_amqp_sink(db, args.amqp_url, exchange)
            ours.append(
                pgherald_latency(db, args.amqp_url, exchange, args.rate, args.seconds, args.split)
            )
            if args.stages:
                print_stages(db)
            theirs.append(reference_latency(db, args.rate, args.seconds))
        finally:
            broker.close()
            db.drop()
        (p50, p99, tps, n), (r50, r99, rtps) = ours[-1], theirs[-1]
        c.say(
            f"  latency #{rep + 1}: pgherald commit-to-consumer p50 {p50:6.2f} ms p99 {p99:6.2f}"
            f" ms ({tps:,.0f} tps, {n:,} messages) | pg_recvlogical commit-to-received p50"
            f" {r50:6.2f} ms p99 {r99:6.2f} ms ({rtps:,.0f} tps)"
        )
    p50 = c.median([o[0] for o in ours])
    p99 = c.median([o[1] for o in ours])
    r50 = c.median([t[0] for t in theirs])
    r99 = c.median([t[1] for t in theirs])
    verdict = "ok" if p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS else "ABOVE TARGET"
    c.say(
        f"latency at {args.rate:,} tx/s (median of {args.repeat}): pgherald p50 {p50:.2f} ms,"
        f" p99 {p99:.2f} ms; pg_recvlogical p50 {r50:.2f} ms, p99 {r99:.2f} ms;"
        f" pgherald/pg_recvlogical p50 {p50 / r50:.1f}x, p99 {p99 / r99:.1f}x"
        f"  [target p50 <= {TARGET_P50_MS:.0f} ms, p99 <= {TARGET_P99_MS:.0f} ms: {verdict}]"
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--consume":
        consumer_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--part", choices=("throughput", "latency", "both"), default="both")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="after each latency run, print when each stage of an event happened after its"
        " commit (p50/p99, from the store's timestamps)",
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--amqp-url", default=DEFAULT_URL)
    parser.add_argument(
        "--split",
        action="store_true",
        help="routing and delivery in a process of their own (pgherald deliver), capture in"
        " this one",
    )
    parser.add_argument(
        "--durable-queue",
        action="store_true",
        help="the bench's throughput queue is durable (the broker writes each message to disk"
        " before it confirms)",
    )
    args = parser.parse_args()
    cluster = c.start_cluster(track_commit_timestamp="on") if args.stages else c.start_cluster()
    try:
        where = (
            "capture here, routing and delivery in `pgherald deliver`"
            if args.split
            else "capture, routing and delivery in this process, as `pgherald run`"
        )
        c.say(f"PostgreSQL {cluster.version}; RabbitMQ at {args.amqp_url.split('@')[-1]}; {where}")
        if args.part in ("throughput", "both"):
            throughput(cluster, args)
        if args.part in ("latency", "both"):
            c.say(
                f"latency: {args.rate:,} one-row transactions/s for {args.seconds}s"
                f" ({CLIENTS} pgbench clients), first {WARM_UP_S:.0f}s left out"
            )
            latency(cluster, args)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
