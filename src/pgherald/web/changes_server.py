"""A small read-only HTTP view of the change log, so the demo serves what it captures.

``/`` is a page of the newest changes (refreshing itself), ``/changes.json?after=ID`` the
changes after a log id in pgherald's own JSON format. It is deliberately minimal: the web
console replaces it. It runs on the standard library's threading HTTP server, with one
short-lived database connection per request.
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jinja2
import psycopg

from pgherald import present
from pgherald.events.formats import to_pgherald_json
from pgherald.store.changelog import ChangeLog, StoredEvent

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("pgherald.web", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
)


def _row(stored: StoredEvent) -> dict[str, Any]:
    e = stored.event
    when = (e.commit_time or e.captured_at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    fields: list[dict[str, str | None]] = []
    if e.op == "update":
        fields = [
            {
                "name": c,
                "old": present.value(e.old, c, "(empty)"),
                "new": present.value(e.new, c, "(empty)"),
            }
            for c in e.changed
        ]
    elif e.op in ("insert", "read") and e.new is not None:
        fields = [
            {"name": c, "old": None, "new": present.value(e.new, c, "(empty)")}
            for c in e.new
            if c not in e.key
        ]
    key = ", ".join(f"{k}={v}" for k, v in e.key.items())
    return {"when": when, "watch": e.watch, "op": e.op, "key": key, "fields": fields}


class ChangesServer:
    """Serves the change log of ``dsn`` (schema ``schema``) on ``host:port`` in a thread."""

    def __init__(self, dsn: str, schema: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.dsn = dsn
        self.schema = schema
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                try:
                    if url.path == "/":
                        body, kind = server.page(), "text/html; charset=utf-8"
                    elif url.path == "/changes.json":
                        after = parse_qs(url.query).get("after", ["0"])[0]
                        if not after.isdigit():
                            self.send_error(HTTPStatus.BAD_REQUEST, "after must be a log id")
                            return
                        body, kind = server.changes_json(int(after)), "application/json"
                    else:
                        self.send_error(HTTPStatus.NOT_FOUND)
                        return
                except psycopg.Error:
                    self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "change log unavailable")
                    return
                data = body.encode()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the demo's terminal is for changes, not access logs

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def page(self, limit: int = 200) -> str:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            log = ChangeLog(conn, self.schema)
            last = log.last_id()
            events = log.read(after_id=max(0, last - limit), limit=limit)
        rows = [_row(s) for s in reversed(events)]
        return _templates.get_template("changes.html").render(events=rows, total=last, refresh=2)

    def changes_json(self, after: int, limit: int = 1000) -> str:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            events = ChangeLog(conn, self.schema).read(after_id=after, limit=limit)
        return json.dumps(
            [{"log_id": s.id, **to_pgherald_json(s.event, with_text=False)} for s in events],
            ensure_ascii=False,
        )

    def start(self) -> ChangesServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
