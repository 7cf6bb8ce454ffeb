"""Helpers for the tests of ``pgherald run`` as a daemon: a webhook receiver that records
what arrives, the daemon as a subprocess with a configuration file, and a stand-in for
systemd's notification socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pgherald.config import Settings
from tests import capture_harness as h

Arrival = tuple[str, bytes]


@dataclass(frozen=True)
class Answer:
    status: int = 200
    delay: float = 0.0


class Receiver:
    """An HTTP server that answers each POST with ``answer(key, body)`` and records the
    (idempotency key, body) of every request it answered with 2xx, in arrival order."""

    def __init__(self, answer: Callable[[str, bytes], Answer] | None = None) -> None:
        self.answer = answer or (lambda key, body: Answer())
        self.arrivals: list[Arrival] = []
        self.requests = 0
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                key = self.headers.get("Idempotency-Key", "")
                with receiver._lock:
                    receiver.requests += 1
                    receiver.headers.append(dict(self.headers.items()))
                answer = receiver.answer(key, body)
                if answer.delay:
                    time.sleep(answer.delay)
                if 200 <= answer.status < 300:
                    with receiver._lock:
                        receiver.arrivals.append((key, body))
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def received(self) -> list[Arrival]:
        with self._lock:
            return list(self.arrivals)

    def keys(self) -> list[str]:
        return [k for k, _ in self.received()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Daemon(h.CaptureProcess):
    """``pgherald run ARGS`` (or ``subcommand``, e.g. ``deliver``) as a subprocess
    (``CaptureProcess``), with helpers to signal it, time its exit and read its log. With
    ``config``, it is started with only ``--config FILE`` and ``flags`` (no connection
    flags, which would override the file's, unless ``flags`` has them)."""

    def __init__(
        self,
        settings: Settings,
        *args: str,
        config: Path | None = None,
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        subcommand: str = "run",
    ) -> None:
        super().__init__(settings, *args, env=env)
        self.config = config
        self.flags = tuple(flags)
        self.subcommand = subcommand

    def start(self) -> Daemon:
        super().start()
        return self

    def command(self) -> list[str]:
        if self.config is None:
            command = super().command()
            command[command.index("run")] = self.subcommand
            return command
        return [
            str(h.PGHERALD), "--config", str(self.config), *self.flags, self.subcommand, *self.args
        ]  # fmt: skip

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def terminate_timed(self, timeout: float = 120.0) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds from the signal to the exit)."""
        assert self.proc is not None and self.alive()
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout)
        return int(status), time.monotonic() - started

    def wait_log(self, text: str, after: int = 0, timeout: float = 60.0) -> int:
        """Waits until ``text`` appears in the log after offset ``after``; its offset."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.log().find(text, after)
            if found >= 0:
                return found
            if not self.alive():
                raise AssertionError(f"pgherald exited while waiting for {text!r}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()[-4000:]}")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object (fails on a line that is not one)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise AssertionError(f"not a JSON line: {line!r}") from e
    return out


def write_config(path: Path, text: str) -> None:
    """Replaces the file in one step, as an editor that renames would."""
    temp = path.with_suffix(".tmp")
    temp.write_text(text)
    os.replace(temp, path)


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class NotifySocket:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pgherald-notify-")) / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Reads all the time, as systemd does (a full socket would drop messages)."""
        while not self._closed.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def env(self) -> Mapping[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def wait_for(self, state: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(state in m.splitlines() for m in list(self.messages)):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {state} notification; got {self.messages}")

    def close(self) -> None:
        self._closed.set()
        self._reader.join(5)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def settings_with(settings: Settings, **changes: Any) -> Settings:
    from dataclasses import replace

    return replace(settings, **changes)
