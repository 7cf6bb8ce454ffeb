"""`pgherald demo`, run as a user runs it: a subprocess, for a bounded time.

What it printed must be exactly what its workload committed (each change once, in
per-row order, nothing from rolled-back transactions), the first change must appear
within 15 seconds, and Ctrl-C must leave no server behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import feedparser
import psutil

SERVING = re.compile(r"serving the changes at (http://\S+)")
LINE = re.compile(r"^\d\d:\d\d:\d\d  (\w+)\s+(\w+)\s+id=(\d+)")
PGHERALD = [sys.executable, "-m", "pgherald"]


PORT = re.compile(r"PostgreSQL on port (\d+)")


def _listening(port: int) -> bool:
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        for c in psutil.net_connections("tcp")
    )


def test_demo_prints_exactly_what_its_workload_committed(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            *PGHERALD,
            "demo",
            "--duration",
            "12",
            "--rate",
            "6",
            "--seed",
            "7",
            "--journal",
            str(journal),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first_change_after: float | None = None
    lines: list[str] = []
    served: list[dict[str, Any]] = []
    page = ""
    url = None
    feed_url = console_url = None
    feed: Any = None
    login = ""
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if (m := SERVING.search(line)) is not None:
            url = m.group(1)
        if m := re.search(r"web console at (\S+) \(user demo, password (\S+)\)", line):
            console_url = m.group(1)
        if (m := re.search(r"Atom feed at (\S+)", line)) is not None:
            feed_url = m.group(1)
        if first_change_after is None and LINE.match(line):
            first_change_after = time.monotonic() - started
        if url and not served and len([x for x in lines if LINE.match(x)]) >= 10:
            # While it runs, the demo also serves what it captured.
            with urllib.request.urlopen(url + "changes.json", timeout=10) as resp:
                served = json.load(resp)
            with urllib.request.urlopen(url, timeout=10) as resp:
                page = resp.read().decode()
            assert console_url and feed_url, lines
            with urllib.request.urlopen(console_url + "login", timeout=10) as resp:
                login = resp.read().decode()
            time.sleep(2)  # routing and the feed sink's delivery
            with urllib.request.urlopen(feed_url, timeout=10) as resp:
                feed = feedparser.parse(resp.read())
    proc.wait(timeout=120)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, stderr

    assert first_change_after is not None and first_change_after < 15, first_change_after
    shown = [(m[1], m[2], m[3]) for m in map(LINE.match, lines) if m]
    truth = [
        (table, op, key["id"])
        for line in journal.read_text().splitlines()
        for table, op, key in json.loads(line)
    ]
    assert len(truth) > 20, "the workload should have committed a fair number of changes"
    assert Counter(shown) == Counter(truth), (
        Counter(truth) - Counter(shown),
        Counter(shown) - Counter(truth),
    )
    # Per row, changes appear in commit order.
    per_row_shown: dict[tuple[str, str], list[str]] = defaultdict(list)
    per_row_truth: dict[tuple[str, str], list[str]] = defaultdict(list)
    for table, op, key in shown:
        per_row_shown[(table, key)].append(op)
    for table, op, key in truth:
        per_row_truth[(table, key)].append(op)
    assert per_row_shown == per_row_truth
    assert not any("ROLLED-BACK" in line for line in lines)
    # Updates show field-level detail, from the replica identity or from the change log.
    assert any(" → " in line for line in lines if " update " in line)
    assert len(served) >= 10
    served_ops = {(e["table"], e["op"], e["key"]["id"]) for e in served}
    assert served_ops <= set(truth) | {(t, o, int(k)) for t, o, k in truth}
    assert "Recent changes" in page and "employees" in page
    assert "<form" in login
    assert feed is not None and not feed.bozo and feed.feed.title == "Finance changes"
    assert len(feed.entries) >= 1
    summary = lines[-1]
    assert f"{len(truth)} changes committed" in summary and f"{len(truth)} captured" in summary


def test_ctrl_c_stops_cleanly_and_leaves_no_server(tmp_path: Path) -> None:
    base = tmp_path / "tmp"
    base.mkdir()
    base.chmod(0o777)
    tmp_path.chmod(0o755)
    tmp_path.parent.chmod(0o755)
    tmp_path.parent.parent.chmod(0o755)
    env = {**os.environ, "TMPDIR": str(base)}
    proc = subprocess.Popen(
        [*PGHERALD, "demo", "--seed", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    port = None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if (m := PORT.search(line)) is not None:
            port = int(m.group(1))
        if LINE.match(line) or time.monotonic() > deadline:
            break
    assert port is not None and _listening(port), "the demo's PostgreSQL should be running"
    assert [p for p in base.iterdir() if p.name.startswith("pgherald-pg-")], (
        "its files are in TMPDIR"
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "captured and shown" in out
    # No server of the demo's is left (its data directory was under TMPDIR). The port alone
    # proves less: another program may take a free port as soon as it is let go.
    left = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(base) in part for part in (p.info["cmdline"] or []))
    ]
    assert left == []
    assert [p for p in base.iterdir() if p.name.startswith("pgherald-pg-")] == []
