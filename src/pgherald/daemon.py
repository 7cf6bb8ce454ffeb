"""``pgherald run``: capture, the snapshot scheduler, delivery and the web console in one
process, or some of them (``Roles``), so they can be split across processes and machines.

The daemon owns three things the parts themselves do not:

- **Stopping within a bound.** ``stop`` stops every part at once: sources stop reading and
  store and acknowledge what they read (a logical source confirms its last stored position
  to the slot, the trigger source commits the queue rows it moved), the router commits its
  batch, delivery finishes the batch it is sending and records its outcome (claims it had
  not sent yet are released). Whatever still runs ``shutdown_timeout`` seconds later is
  abandoned: it is logged, ``run`` raises ``ShutdownIncomplete``, and the process must exit
  (the CLI exits 1 at once): its open transactions roll back with its connections, so an
  unacknowledged batch is captured again and a claimed delivery is sent again by the next
  run. Nothing committed is lost either way.
- **Reloading the configuration** (SIGHUP): the file is read again; an invalid one is
  logged in one line and changes nothing. Otherwise ``declared.apply`` makes the store
  follow the file's changes, the log level and format change in place, and a part whose
  inputs changed is restarted cleanly (stopped as above, then started again): capture when
  the watches it captures changed, delivery when the settings its sinks are built with
  changed (presentation, ``[smtp]``). Sinks that change are picked up by the running
  delivery engine itself, without a restart (``DeliveryEngine``).
- **Telling the service manager** (systemd ``Type=notify``): READY, RELOADING, STOPPING and
  a one-line STATUS, through ``$NOTIFY_SOCKET`` when it is set.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgherald import __version__, app, declared, logs, pruning
from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.errors import ConfigError, PgHeraldError
from pgherald.sources.logical import format_lsn
from pgherald.store import deliveries, migrations
from pgherald.store import watches as registry

log = logging.getLogger("pgherald")

CAPTURE_METHODS = ("logical", "trigger", "listen")


@dataclass(frozen=True)
class Roles:
    """Which parts this process runs (``pgherald run --no-capture`` and so on)."""

    capture: bool = True
    """The logical, trigger and listen sources."""
    snapshots: bool = True
    """The snapshot scheduler."""
    delivery: bool = True
    """Routing, delivery to the sinks and e-mail digests."""
    web: tuple[str, int] | None = None
    """Serve the web console on (host, port)."""
    sinks: tuple[str, ...] = ()
    """Deliver only to these sinks (``pgherald deliver --sink``); all enabled ones if empty."""

    def check(self) -> None:
        if not (self.capture or self.snapshots or self.delivery or self.web):
            raise ConfigError(
                "nothing to run: --no-capture, --no-snapshots and --no-delivery leave no part"
                " (add --web HOST:PORT, or drop one of them)"
            )

    def describe(self) -> str:
        parts = [
            name
            for name, on in (
                ("capture", self.capture),
                ("snapshots", self.snapshots),
                ("delivery", self.delivery),
            )
            if on
        ]
        if self.delivery and self.sinks:
            parts[-1] += f" (only to sinks {', '.join(map(repr, self.sinks))})"
        if self.web is not None:
            parts.append("web console")
        return ", ".join(parts)


class ShutdownIncomplete(PgHeraldError):
    """Parts still ran when ``shutdown_timeout`` passed; ``abandoned`` says which."""

    def __init__(self, message: str, abandoned: Sequence[str]) -> None:
        super().__init__(message)
        self.abandoned = list(abandoned)


# -- systemd ------------------------------------------------------------------------------------


def notify(*states: str) -> bool:
    """Sends ``READY=1`` and the like to systemd (``Type=notify``); False without
    ``$NOTIFY_SOCKET`` or when it cannot be reached (a service manager's business, never a
    reason to stop)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)  # a manager that does not read must not stop pgherald
            s.connect(address)
            s.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


# -- secrets --------------------------------------------------------------------------------------


def secrets_of(settings: Settings) -> set[str]:
    """Every secret the configuration holds: the DSN's password, the ``[smtp]`` password,
    secrets in the sinks' options, and the passwords libpq and the web console take from
    the environment."""
    found = logs.secrets_in_dsn(settings.dsn)
    found |= logs.secrets_in_options(settings.smtp)  # [smtp]: the mail server's login
    for sink in settings.sinks:
        found |= logs.secrets_in_options(sink.options)
    for name in ("PGPASSWORD", "PGHERALD_WEB_SECRET"):
        value = os.environ.get(name)
        if value:
            found.add(value)
    return found


def _stored_sink_secrets(settings: Settings) -> set[str]:
    """Secrets in the options of the sinks in the store (made with ``pgherald sink add``)."""
    with connect(settings, autocommit=True) as conn:
        migrations.require_current(conn, settings.schema)
        stored = deliveries.list_sinks(conn, settings.schema)
    found: set[str] = set()
    for sink in stored:
        found |= logs.secrets_in_options(sink.options)
    return found


# -- what a part runs on, to tell whether a reload changed it ----------------------------------


def _capture_inputs(settings: Settings) -> tuple[Any, ...]:
    """The watches capture runs (snapshot watches are picked up by the scheduler itself)
    and the settings it was built with."""
    with connect(settings, autocommit=True) as conn:
        found = registry.list_watches(conn, settings.schema)
    watched = sorted(
        (
            w.name,
            w.method,
            w.schema_name,
            w.table_name,
            tuple(w.key_columns or ()),
            tuple(w.columns) if w.columns is not None else None,
            tuple(w.ignore_columns or ()),
            json.dumps(dict(w.options or {}), sort_keys=True, default=str),
            w.enabled,
        )
        for w in found
        if w.method in CAPTURE_METHODS
    )
    return (tuple(watched), settings.batch_size, settings.batch_interval)


def _delivery_inputs(settings: Settings) -> tuple[Any, ...]:
    """The settings delivery's sinks are built with: what people receive looks like (locale,
    time zone, links, templates) and the mail server of ``smtp = "settings"`` sinks
    (``[smtp]``), and the engine's connection budget (``delivery_connections``). The sinks
    themselves are not among them: the running engine follows
    the store's sinks by itself (``DeliveryEngine``), a reload's changes included."""
    presentation = (settings.locale, settings.timezone, settings.public_url, settings.templates_dir)
    smtp = json.dumps(dict(settings.smtp), sort_keys=True, default=str)
    return (presentation, smtp, settings.delivery_connections)


_WEB_SETTINGS = ("locale", "timezone", "public_url", "templates_dir")

_ABANDONED = {
    "pgherald-logical": "logical capture (what it read and did not acknowledge is read"
    " again from the slot by the next run)",
    "pgherald-trigger": "trigger capture (the queue rows it had not committed stay queued"
    " for the next run)",
    "pgherald-listen": "listen capture",
    "pgherald-snapshots": "a snapshot run (rolled back; it runs again when due)",
    "pgherald-router": "routing (its last batch is routed again by the next run)",
    "pgherald-prune": "a prune pass (its last batch rolls back; the next pass goes on)",
    "pgherald-delivery": "delivery (the deliveries it had claimed are released and sent"
    " again by the next run)",
    "pgherald-digests": "e-mail digests (sent again by the next run)",
    "pgherald-web": "the web console",
}


def _join_all(threads: Sequence[threading.Thread], deadline: float) -> dict[str, float]:
    """Waits until every thread ended or ``deadline`` passed; when each was seen ended."""
    ended: dict[str, float] = {}
    while True:
        now = time.monotonic()
        for t in threads:
            if t.name not in ended and not t.is_alive():
                ended[t.name] = now
        if len(ended) == len({t.name for t in threads}) or now >= deadline:
            return ended
        time.sleep(0.02)


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


class Daemon:
    """Runs the parts ``roles`` names until ``stop`` is set (module docstring).

    ``reload`` reads the configuration again (the CLI reads the file, the environment and
    its flags as at start); SIGHUP calls ``request_reload``, SIGTERM ``request_stop``, both
    safe in a signal handler: the work happens in ``run``'s loop.
    """

    def __init__(
        self,
        settings: Settings,
        roles: Roles | None = None,
        *,
        stop: threading.Event | None = None,
        resync: bool = False,
        reload: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.roles = roles or Roles()
        self.stop = stop or threading.Event()
        self.resync = resync
        self._reload = reload
        self._reload_requested = threading.Event()
        self._stop_signal: int | None = None
        self.capture: app.Capture | None = None
        self.delivery: app.Delivery | None = None
        self.web: app._SourceThread | None = None
        self._web_stop = threading.Event()
        self.prune: app._SourceThread | None = None
        self._prune_job: pruning.PruneJob | None = None
        self._prune_stop = threading.Event()
        self._capture_inputs: tuple[Any, ...] | None = None
        self._delivery_inputs: tuple[Any, ...] | None = None
        self.reloads = 0
        """Reloads applied (for tests and status)."""

    # -- requests (signal handlers) ----------------------------------------------------------

    def request_stop(self, signum: int | None = None) -> None:
        self._stop_signal = signum
        self.stop.set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Runs until stopped; raises what made a part fail, or ``ShutdownIncomplete``."""
        self.roles.check()
        failure: BaseException | None = None
        abandoned: list[str] = []
        try:
            self._start()
            while not self.stop.wait(0.2):
                failure = self._failure()
                if failure is not None:
                    break
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self.reload_now()
        except BaseException as e:
            failure = e
        finally:
            abandoned, error = self._shutdown(failed=failure is not None)
            failure = failure or error
        if failure is not None:
            raise failure
        if abandoned:
            raise ShutdownIncomplete(
                f"gave up after {self.settings.shutdown_timeout:g}s waiting for"
                f" {'; '.join(abandoned)}",
                abandoned,
            )

    def _start(self) -> None:
        s = self.settings
        logs.add_secrets(secrets_of(s))
        capture = self._new_capture(resync=self.resync) if self._captures() else None
        delivery = self._new_delivery() if self.roles.delivery else None
        log.info(
            "pgherald %s starting (%s); its store is schema %r at %s",
            __version__,
            self.roles.describe(),
            s.schema,
            s.redacted_dsn(),
        )
        self.capture = capture
        self.delivery = delivery
        if capture is not None:
            capture.start()
            self._describe_capture(capture)
        if delivery is not None:
            delivery.start()
            self._describe_delivery(delivery)
        if self.roles.web is not None:
            self._start_web(self.roles.web)
        self._start_prune()
        notify("READY=1", f"STATUS={self._status()}")

    def _captures(self) -> bool:
        return self.roles.capture or self.roles.snapshots

    def _new_capture(self, resync: bool = False) -> app.Capture:
        self._capture_inputs = _capture_inputs(self.settings)
        return app.Capture(
            self.settings,
            resync=resync,
            stop=threading.Event(),
            sources=self.roles.capture,
            snapshots=self.roles.snapshots,
        )

    def _new_delivery(self) -> app.Delivery:
        self._delivery_inputs = _delivery_inputs(self.settings)
        logs.add_secrets(_stored_sink_secrets(self.settings))
        return app.Delivery(self.settings, stop=threading.Event(), sinks=self.roles.sinks or None)

    def _start_web(self, address: tuple[str, int]) -> None:
        # Imported here: the console's pages import the admin modules, which import app.
        from pgherald.web.server import serve as serve_web

        host, port = address
        settings = self.settings
        self._web_stop = threading.Event()
        self.web = app._SourceThread(
            "pgherald-web",
            lambda: serve_web(settings, self._web_stop, host=host, port=port),
            self._web_stop,
        )
        self.web.start()

    def _start_prune(self) -> None:
        """The change log's retention: a prune pass at start and every ``prune_interval``
        (``pgherald.pruning``; one pass at a time per store, whichever instance runs it)."""
        job = pruning.job_for(self.settings)
        if job is None or not (self._captures() or self.roles.delivery):
            return
        self._prune_job = job
        self.prune = app._SourceThread(
            "pgherald-prune", lambda: job.run(self._prune_stop), self._prune_stop
        )
        self.prune.start()
        log.info("pruning the change log by its retentions every %s", self.settings.prune_interval)

    def _describe_capture(self, capture: app.Capture) -> None:
        s = self.settings
        if capture.source is not None:
            log.info(
                "capturing logical watches %s from replication slot %r (publication %r)"
                " whenever this instance leads them",
                _names(w.name for w in capture.source.watches),
                s.slot,
                s.publication,
                extra={"slot": s.slot},
            )
        if capture.trigger is not None:
            log.info(
                "capturing trigger watches %s from the trigger queue whenever this instance"
                " leads them",
                _names(w.name for w in capture.trigger.watches),
            )
        if capture.listen is not None:
            log.info(
                "capturing the notifications of listen watches %s whenever this instance"
                " leads them",
                _names(w.name for w in capture.listen.watches),
            )
        if capture.scheduler is not None:
            log.info(
                "running snapshot watches when they are due, whenever this instance leads them"
            )

    def _describe_delivery(self, delivery: app.Delivery) -> None:
        sinks = delivery.engine.sinks
        digests = delivery.digests.sinks
        if sinks:
            log.info(
                "routing the change log and delivering to sinks %s",
                ", ".join(f"{n!r} ({cfg.kind})" for n, (_, cfg) in sorted(sinks.items())),
            )
        if digests:
            log.info("sending e-mail digests of sinks %s when they are due", _names(digests))
        if not sinks and not digests:
            log.info(
                "routing the change log; no enabled sink to deliver to yet (sinks added with"
                " `pgherald sink add`, in the configuration file or in the console are served"
                " as they come)"
            )

    def _status(self) -> str:
        parts = []
        if self.capture is not None:
            parts.append("capturing")
        if self.delivery is not None:
            parts.append(f"delivering to {len(self.delivery.engine.sinks)} sink(s)")
        if self.web is not None:
            parts.append("serving the console")
        return ", ".join(parts) or "idle"

    def _failure(self) -> BaseException | None:
        for part in (self.capture, self.delivery):
            if part is not None and part.errors:
                return part.errors[0]
        if self.web is not None and self.web.error is not None:
            return self.web.error
        return None

    # -- reloading ---------------------------------------------------------------------------

    def reload_now(self) -> bool:
        """Reads the configuration again and applies it; False (and the configuration it
        had) when it is invalid or could not be applied."""
        if self._reload is None:
            log.warning("cannot reload: this pgherald was not started from a configuration")
            return False
        old = self.settings
        source = str(old.config_file) if old.config_file else "PGHERALD_* variables and flags"
        log.info("reloading the configuration (%s)", source)
        notify("RELOADING=1", "STATUS=reloading the configuration")
        changes = declared.Changes()
        try:
            new = self._reload()
            logs.add_secrets(secrets_of(new))
            declared.apply(old, new, changes)
        except (PgHeraldError, psycopg.Error) as e:
            done = changes.describe()
            log.error(
                "configuration not reloaded: %s; %s",
                _one_line(e),
                (
                    f"already applied: {'; '.join(done)}; the rest is not, and pgherald goes"
                    " on with the configuration it had"
                    if done
                    else "nothing was changed, and pgherald goes on with the configuration it had"
                ),
            )
            notify("READY=1", f"STATUS={self._status()} (last reload failed)")
            return False
        self.settings = new
        if self._prune_job is not None:
            self._prune_job.settings = new  # retentions apply from the next pass
        logs.setup(new.log_level, new.log_format)
        for name in changes.watches_unchanged:
            log.warning(
                "watch %r changed in the configuration file, but pgherald does not change an"
                " existing watch: remove it (`pgherald watch remove %s`) and reload to add it"
                " again",
                name,
                name,
            )
        restarted = self._restart_changed_parts()
        if self.web is not None and any(getattr(old, k) != getattr(new, k) for k in _WEB_SETTINGS):
            log.warning(
                "the web console keeps its locale, time zone, public URL and templates until"
                " pgherald restarts"
            )
        self.reloads += 1
        summary = "; ".join([*changes.describe(), *restarted]) or "nothing to change"
        log.info("configuration reloaded: %s", summary)
        notify("READY=1", f"STATUS={self._status()}")
        return True

    def _restart_changed_parts(self) -> list[str]:
        done: list[str] = []
        if self._captures():
            inputs = _capture_inputs(self.settings)
            if inputs != self._capture_inputs or self.capture is None:
                self._restart_capture()
                done.append("restarted capture" if self.capture else "capture has no watches")
        if self.roles.delivery:
            inputs = _delivery_inputs(self.settings)
            if inputs != self._delivery_inputs:
                self._restart_delivery()
                done.append("restarted delivery for the changed settings")
        return done

    def _restart_capture(self) -> None:
        old = self.capture
        if old is not None:
            log.info("restarting capture for the changed watches: stopping it first")
            self._close_parts([old], self.settings.shutdown_timeout, "capture restart")
            self.capture = None
        try:
            capture = self._new_capture()
        except ConfigError as e:
            log.warning("capture is idle: %s", _one_line(e))
            return
        self.capture = capture.start()
        self._describe_capture(capture)

    def _restart_delivery(self) -> None:
        old = self.delivery
        if old is not None:
            log.info("restarting delivery for the changed settings: finishing what it sends first")
            self._close_parts([old], self.settings.shutdown_timeout, "delivery restart")
            self.delivery = None
        delivery = self._new_delivery()
        self.delivery = delivery.start()
        self._describe_delivery(delivery)

    def _close_parts(
        self, parts: Sequence[app.Capture | app.Delivery], bound: float, why: str
    ) -> None:
        """Stops parts for a restart; one that does not stop in time is a failure."""
        threads = [t for p in parts for t in p.threads]
        for p in parts:
            p.stop.set()
        deadline = time.monotonic() + bound
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise PgHeraldError(
                f"{why}: {', '.join(alive)} did not stop within {bound:g}s (shutdown_timeout)"
            )
        for p in parts:
            p.close(timeout=1.0)  # joined already: this raises what ended a thread, if anything

    # -- stopping ----------------------------------------------------------------------------

    def _shutdown(self, failed: bool) -> tuple[list[str], BaseException | None]:
        """Stops every part within ``shutdown_timeout``; what still runs, and an error a
        part ended with while stopping."""
        s = self.settings
        bound = s.shutdown_timeout
        threads: list[app._SourceThread] = []
        parts = [p for p in (self.capture, self.delivery) if p is not None]
        for p in parts:
            threads += p.threads
        if self.web is not None:
            threads.append(self.web)
        if self.prune is not None:
            threads.append(self.prune)
        if not threads:
            return [], None
        why = f" (signal {signal.Signals(self._stop_signal).name})" if self._stop_signal else ""
        if failed:
            why = " (a part failed)"
        log.info(
            "stopping%s: no new changes are read; what is in flight is finished and"
            " acknowledged, for at most %gs",
            why,
            bound,
        )
        notify("STOPPING=1", "STATUS=stopping")
        started = time.monotonic()
        deadline = started + bound
        for p in parts:
            p.stop.set()
        self._web_stop.set()
        self._prune_stop.set()
        self.stop.set()
        took = _join_all(threads, deadline)
        running = [t for t in threads if t.is_alive()]
        given_up = [t.name for t in running]
        if self.delivery is not None and self.delivery.engine.cut_short:
            # it ended on time only because it cancelled sends still open at the bound
            given_up.append("pgherald-delivery")
        error: BaseException | None = None
        if not running:
            for p in parts:
                try:
                    p.close(timeout=1.0)  # all joined: releases what they hold, raises errors
                except BaseException as e:
                    error = error or e
            if self.web is not None and self.web.error is not None:
                error = error or self.web.error
        summary = self._summary()
        if given_up:
            abandoned = list(dict.fromkeys(_ABANDONED.get(name, name) for name in given_up))
            log.error(
                "gave up after %gs waiting for %s; exiting without them",
                bound,
                "; ".join(abandoned),
            )
            return abandoned, error
        slowest = max(took, key=lambda name: took[name] - started)
        log.info(
            "stopped %sin %.1fs (the last to stop: %s)%s",
            "" if failed or error else "cleanly ",
            time.monotonic() - started,
            slowest.removeprefix("pgherald-"),
            f": {summary}" if summary else "",
        )
        return [], error

    def _summary(self) -> str:
        """What this run did, in a phrase: positions acknowledged, events delivered."""
        out: list[str] = []
        capture = self.capture
        if capture is not None and capture.source is not None and capture.source.stored_lsn:
            out.append(
                f"logical capture acknowledged up to {format_lsn(capture.source.stored_lsn)}"
                f" on slot {self.settings.slot!r}"
            )
        delivery = self.delivery
        if delivery is not None:
            if delivery.router.routed_events:
                out.append(f"routed {delivery.router.routed_events} events")
            for name, stats in sorted(delivery.engine.stats.items()):
                if stats.delivered or stats.retried or stats.dead:
                    trouble = [f"{stats.retried} to retry"] if stats.retried else []
                    trouble += [f"{stats.dead} dead-lettered"] if stats.dead else []
                    out.append(
                        f"delivered {stats.delivered} to {name!r}"
                        + (f" ({', '.join(trouble)})" if trouble else "")
                    )
        return "; ".join(out)
