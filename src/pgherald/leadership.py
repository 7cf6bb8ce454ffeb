"""Leadership: of several pgherald instances on one change log, exactly one captures each source.

Two or more ``pgherald run`` instances (on one machine or several) may run against the same
change log, so that one can die without capture stopping. Each capturing part is a *role*
(logical capture of one slot, trigger capture, listen capture, the snapshot scheduler),
and a role is led by whoever holds its PostgreSQL advisory lock: a session lock keyed by
the change log's schema and the role's name, held on one dedicated connection per process
(the *lock connection*). The others stand by and try the lock again every second.

Why an advisory lock: it lives in the server that holds the change log, so there is
nothing else to run, and it is tied to a session: a leader that dies (SIGKILL, a crash,
its host gone) loses its session, the server drops its locks, and a standby takes over
within about a second (``keepalives`` makes the server notice a vanished host within about
ten seconds). The new leader resumes from the last acknowledged position, which its
source reads from the change log's checkpoints as after any restart.

**Fencing.** A leader checks its lock connection every second, and at once when the server
says anything on it (a terminated session says so before it closes). If it cannot confirm
that it still holds its locks, it stops capturing at once (the sources' stop event) and
stands by again, because another instance may already have taken over. Behind that fence
stand three more: the logical slot accepts one walsender at a time (``active_pid``), the
trigger queue's drainer holds a lock of its own, and the change log's unique event ids
make a batch stored twice harmless.

Delivery needs no leader: its workers share the work through ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, LiteralString

import psycopg

from pgherald.db.connect import connect, parse_dsn
from pgherald.db.sqlfiles import named_query
from pgherald.errors import ConnectionFailed

log = logging.getLogger("pgherald.leadership")

_FILE: Final = "leadership.sql"
_NAME: Final = re.compile(r"^pgherald-lead (\d+)@(.+)$")
_SLICE: Final = 0.1
"""Seconds between looks at the stop event, the lock connection's socket and new waiters."""


def _q(name: str) -> LiteralString:
    return named_query(_FILE, name)


def lock_key(schema: str, role: str) -> int:
    """The advisory lock key of one role of one change log (a signed 64-bit integer).

    A hash of both names, so that two change logs (schemas) in one database never share a
    leader, and neither do two logical sources with different slots.
    """
    digest = hashlib.blake2b(f"pgherald.lead:{schema}:{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def identity(pid: int | None = None, host: str | None = None) -> str:
    """What the lock connection calls itself (its ``application_name``), so that a standby
    can say which process on which host leads."""
    return f"pgherald-lead {pid or os.getpid()}@{host or socket.gethostname()}"[:63]


@dataclass(frozen=True)
class Holder:
    """Who holds a role's lock, as the server tells it."""

    backend_pid: int
    pid: int | None = None
    host: str | None = None
    client: str | None = None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Holder:
        backend, app_name, addr, hostname = row
        found = _NAME.match(app_name or "")
        if found:
            return cls(int(backend), int(found.group(1)), found.group(2))
        return cls(int(backend), client=hostname or addr)

    def describe(self) -> str:
        if self.pid is not None:
            return f"pid {self.pid} on host {self.host}"
        client = f" (client {self.client})" if self.client else ""
        return f"server process {self.backend_pid}{client}"


class Role:
    """One capturing part and its leadership state (shared by the elector and the source)."""

    def __init__(self, name: str, title: str, key: int) -> None:
        self.name = name
        self.title = title
        self.key = key
        self.leading = threading.Event()
        """Set while this process holds the lock."""
        self.term = threading.Event()
        """Set when the current term ends (lock lost, or stopping): the source's stop."""
        self.decided = threading.Event()
        """Set once the lock was tried: this process leads, or knows it stands by."""
        self.terms = 0
        self.holder: Holder | None = None
        self.since: float | None = None
        self._wanted = False
        self._held = False
        self._waiting_since: float | None = None

    def status(self) -> str:
        """``leading`` or ``standby``, for health reports."""
        return "leading" if self.leading.is_set() else "standby"


class Leadership:
    """Holds the lock connection and elects this process to the roles it can get.

    ``start`` runs the elector in a thread; each source's thread calls ``lead``, which
    waits for the role, runs the source until its term ends, and waits again. ``close``
    (after the sources ended, so that their last batches are stored first) gives the locks
    back, so that a standby takes over at once after a clean stop.
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        stop: threading.Event,
        *,
        retry: float = 1.0,
        check: float = 1.0,
        name: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.stop = stop
        self.retry = retry
        self.check = check
        self.name = name or identity()
        self.roles: dict[str, Role] = {}
        self._lock = threading.Lock()
        self._poke = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self.error: BaseException | None = None
        """What ended the elector unexpectedly (a bug): every role would wait for it forever,
        so it stops the sources instead, and whoever runs them raises this."""

    def role(self, name: str, title: str) -> Role:
        """Registers a role (before ``start``)."""
        made = Role(name, title, lock_key(self.schema, name))
        self.roles[name] = made
        return made

    def status(self) -> dict[str, str]:
        """Each role's state in words: ``leading`` or ``standby (held by ...)``."""
        out = {}
        for r in self.roles.values():
            held = (
                f" (held by {r.holder.describe()})" if r.holder and not r.leading.is_set() else ""
            )
            out[r.name] = f"{r.status()}{held}"
        return out

    # -- the source's side --------------------------------------------------------------

    def lead(self, role: Role, body: Callable[[threading.Event], None]) -> None:
        """Runs ``body(term)`` whenever this process leads ``role``, until ``stop``.

        ``body`` must return soon after ``term`` is set. An error it raises after its term
        ended (the lock was lost under it) is logged and the role waits to lead again; a
        lost or refused connection (the server restarting) gives the role up for a moment,
        so that it is tried again, here or by another instance; any other error ends the
        role and is raised.
        """
        self._want(role, True)
        try:
            while not self.stop.is_set():
                term = self._wait_to_lead(role)
                if term is None:
                    return
                try:
                    body(term)
                except Exception as e:
                    if term.is_set() and not self.stop.is_set():
                        log.warning("%s ended after losing the lead: %s", role.title, _line(e))
                        continue
                    if not isinstance(e, psycopg.OperationalError | ConnectionFailed):
                        raise
                    pause = max(self.retry * 2, 1.0)
                    log.warning("%s: %s; trying again in %.0f s", role.title, _line(e), pause)
                    self._want(role, False)
                    self.stop.wait(pause)
                    self._want(role, True)
                    continue
                if not term.is_set():
                    return  # the source ended by itself: the role is given back
                if not self.stop.is_set():
                    log.warning("%s stopped: no longer leading it; standing by", role.title)
        finally:
            self._want(role, False)

    def _want(self, role: Role, wanted: bool) -> None:
        with self._lock:
            role._wanted = wanted
            if not wanted:
                role.leading.clear()
                role.term.set()
        self._poke.set()

    def _wait_to_lead(self, role: Role) -> threading.Event | None:
        while not self.stop.is_set():
            if role.leading.wait(_SLICE):
                with self._lock:
                    if role.leading.is_set():
                        return role.term
        return None

    # -- the elector ---------------------------------------------------------------------

    def start(self) -> Leadership:
        self._thread = threading.Thread(target=self._run, name="pgherald-leadership", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Gives up every role and closes the lock connection (the server frees the locks)."""
        self._closing.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._elect()
        except BaseException as e:
            # Not a lost connection (those are retried): a process whose elector died would
            # stay up capturing nothing, its roles waiting for a lock nobody takes.
            log.exception("leadership: the elector failed; stopping")
            self.error = e
            self.stop.set()
            self._end_terms()

    def _elect(self) -> None:
        said: str | None = None
        try:
            while not self._closing.is_set():
                if self._conn is None:
                    if self.stop.is_set():
                        self._end_terms()
                        self._closing.wait(_SLICE)
                        continue
                    try:
                        self._conn = self._connect()
                        said = None
                    except (psycopg.Error, ConnectionFailed) as e:
                        # Every second, as a standby tries the lock: a server that is back
                        # gets its leader back at once. Said once per different reason.
                        if _line(e) != said:
                            said = _line(e)
                            log.warning(
                                "leadership: cannot connect (%s); trying every %.0f s",
                                said,
                                self.retry,
                            )
                        self._closing.wait(self.retry)
                        continue
                try:
                    self._tick(self._conn)
                    self._wait(self._conn)
                except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                    self._lost(_line(e))
        finally:
            self._end_terms()
            if self._conn is not None:
                self._give_back(self._conn)
                self._conn.close()

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        """Unlocks every role held, before the connection closes: the server would drop
        the locks anyway, but only once the session has ended, a moment later; this way a
        successor (another instance, or this process's next ``Capture``) leads at once."""
        for role in self.roles.values():
            if role._held:
                try:
                    conn.execute(_q("unlock"), {"key": role.key})
                except psycopg.Error:
                    return  # the connection is gone: so are its locks
                role._held = False
                log.info("no longer leading %s", role.title)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = connect(
            self.dsn, autocommit=True, application_name=self.name, **_keepalives(self.dsn)
        )
        conn.execute(_q("keepalives"))
        with contextlib.suppress(psycopg.errors.UndefinedObject):  # older than 12: keepalives
            conn.execute(_q("user_timeout"))
        return conn

    def _tick(self, conn: psycopg.Connection[Any]) -> None:
        """Gives back the roles held and no longer wanted (a source that ended), tries
        those wanted and not held (not while stopping), and proves the connection still
        works (every query does)."""
        stopping = self.stop.is_set()
        if stopping:
            self._end_terms()
        for role in list(self.roles.values()):
            with self._lock:
                wanted, held = role._wanted, role._held
            if held and not wanted:
                conn.execute(_q("unlock"), {"key": role.key})
                with self._lock:
                    role._held = False
                log.info("no longer leading %s", role.title)
            elif wanted and not held and not stopping:
                self._try(conn, role)
        conn.execute("SELECT 1")

    def _try(self, conn: psycopg.Connection[Any], role: Role) -> None:
        row = conn.execute(_q("try_lock"), {"key": role.key}).fetchone()
        now = time.monotonic()
        if row and row[0]:
            with self._lock:
                if not role._wanted:  # gave up meanwhile: give it back at the next tick
                    role._held = True
                    return
                role._held = True
                role.term = threading.Event()
                role.terms += 1
                role.holder = None
                role.since = now
                waited = role._waiting_since
                role._waiting_since = None
                role.leading.set()
            role.decided.set()
            after = f" after standing by {now - waited:.1f} s" if waited is not None else ""
            log.info("leading %s%s", role.title, after)
            return
        found = conn.execute(
            _q("holder"), {"high": (role.key >> 32) & 0xFFFFFFFF, "low": role.key & 0xFFFFFFFF}
        ).fetchone()
        holder = Holder.from_row(found) if found else None
        if role._waiting_since is None:
            role._waiting_since = now
        if holder is not None and holder != role.holder:
            role.holder = holder
            log.info("waiting to lead %s (held by %s)", role.title, holder.describe())
        role.decided.set()

    def _wait(self, conn: psycopg.Connection[Any]) -> None:
        """Until the next tick: ``check`` seconds, or at once when a source wants to lead,
        when stopping, or when the server sent something on the idle lock connection (a
        terminated session says so before it closes); the next tick's queries tell."""
        deadline = time.monotonic() + self.check
        fd = conn.fileno()
        while time.monotonic() < deadline and not self._closing.is_set():
            if self._poke.is_set():
                self._poke.clear()
                return
            if self.stop.is_set() and any(r.leading.is_set() for r in self.roles.values()):
                return
            readable, _, _ = select.select([fd], [], [], _SLICE)
            if readable:
                return

    def _lost(self, reason: str) -> None:
        """The lock connection failed: whatever it held may be another instance's by now."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        with self._lock:
            lost = [r for r in self.roles.values() if r._held]
            for r in lost:
                r._held = False
                r.leading.clear()
                r.term.set()
        for r in lost:
            log.error(
                "lost the lead of %s (the lock connection failed: %s); stopped capturing it",
                r.title,
                reason,
            )
        if not lost and not self.stop.is_set():
            log.warning("leadership: the lock connection failed (%s); reconnecting", reason)
        self._closing.wait(self.retry)

    def _end_terms(self) -> None:
        """Stopping: every source's term ends (the locks stay until ``close``)."""
        with self._lock:
            for r in self.roles.values():
                r.term.set()
                r.leading.clear()


def _keepalives(dsn: str) -> dict[str, Any]:
    """The client's side of ``keepalives``: a lock connection whose server vanished fails
    within about ten seconds, so the leader stops capturing rather than hang. What the DSN
    says itself wins."""
    wanted = {
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10000,
    }
    given = parse_dsn(dsn)
    return {k: v for k, v in wanted.items() if k not in given}


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


CAPTURE_APPLICATION: Final = "pgherald-capture"
"""The ``application_name`` of logical capture's replication connection (unless the DSN
names one)."""


def wait_for_slot(dsn: str, slot: str, term: threading.Event, others: float = 10.0) -> None:
    """Before a new leader of logical capture streams: waits for the slot to be free.

    The previous leader's walsender still holds the slot for a moment after it died: the
    server ends it at once after a SIGKILL (the socket closes), but after the previous
    leader's *host* vanished only ``wal_sender_timeout`` ends it. So a holder that is a
    pgherald capture is waited for up to that timeout and 5 s more; any other program
    ``others`` seconds. Then capture starts anyway, and fails with its usual "in use"
    error if the slot is still held. Returns early when ``term`` is set.
    """
    with connect(dsn, autocommit=True, application_name="pgherald-catalog") as conn:
        started = time.monotonic()
        said: int | None = None
        while not term.is_set():
            row = conn.execute(_q("slot_holder"), {"slot": slot}).fetchone()
            if row is None:
                return
            backend, app_name, addr = row
            limit = others
            if app_name == CAPTURE_APPLICATION:
                timeout = conn.execute(_q("wal_sender_timeout")).fetchone()
                limit = max(others, (int(timeout[0]) / 1000 if timeout else 60.0) + 5.0)
            if said != backend:
                said = backend
                log.info(
                    "replication slot %s is still streamed by server process %s (%s%s);"
                    " waiting up to %.0f s for it to let go",
                    slot,
                    backend,
                    app_name or "a program",
                    f" at {addr}" if addr else "",
                    limit,
                )
            if time.monotonic() - started > limit:
                return
            term.wait(0.2)
