"""The examples of docs/how-to/python-api.md, run as they are written (DSN aside)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Database

DOC = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "python-api.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def run_example(
    db: Database, code: str, writes: list[str], until: Callable[[str], bool] | None = None
) -> str:
    """Runs an example as a program; a writer repeats ``writes`` until it ends.

    A program that runs until stopped gets SIGTERM once its output satisfies ``until``
    (and must then end cleanly)."""
    code = code.replace('"postgresql:///shop"', repr(db.dsn))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    done = threading.Event()
    if until is not None:
        assert proc.stdout is not None
        seen = ""
        deadline = time.monotonic() + 90
        stdout = proc.stdout
        reader_done = threading.Event()
        lines: list[str] = []

        def read() -> None:
            for line in stdout:
                lines.append(line)
            reader_done.set()

        threading.Thread(target=read, daemon=True).start()

    def writer() -> None:
        n = 0
        while not done.is_set():
            time.sleep(1.0)
            with db.connect() as conn:
                for w in writes:
                    conn.execute(w.format(n=n).encode())
            n += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        if until is None:
            out, err = proc.communicate(timeout=90)
        else:
            while not until(seen := "".join(lines)) and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
            assert until(seen), seen
            proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=60)[1]
            reader_done.wait(10)
            out = "".join(lines)
    finally:
        done.set()
        proc.kill()
        thread.join()
    assert proc.returncode == 0, err
    return out


def test_the_docs_have_the_examples() -> None:
    assert len(examples()) == 2


def test_iterate_example(db: Database) -> None:
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric)")
    out = run_example(
        db,
        examples()[0],
        [
            "INSERT INTO orders VALUES ({n}, 'new', 10)",
            "UPDATE orders SET status = 'paid' WHERE id = {n}",
        ],
    )
    lines = out.splitlines()
    assert lines[-1].startswith("update {'id': '") and lines[-1].endswith("['status']")
    assert any(line.startswith("insert {'id': '") for line in lines)


def test_callbacks_example(db: Database) -> None:
    db.execute("CREATE TABLE ports (id int PRIMARY KEY, name text)")
    out = run_example(
        db,
        examples()[1],
        [
            "INSERT INTO ports VALUES ({n}, 'Genoa')",
            "UPDATE ports SET name = 'Genova' WHERE id = {n}",
        ],
        until=lambda out: (
            "clearing the cache of port" in out
            and re.search(r"^port \d+ insert$", out, re.MULTILINE) is not None
        ),
    )
    assert "clearing the cache of port" in out
    assert re.search(r"^port \d+ insert$", out, re.MULTILINE)
