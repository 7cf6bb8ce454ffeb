"""The examples of docs/how-to/python-api.md, run as they are written (DSN aside)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import Database

DOC = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "python-api.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


def run_example(db: Database, code: str, writes: list[str]) -> str:
    """Runs an example as a program; a writer repeats ``writes`` until it ends."""
    code = code.replace('"postgresql:///shop"', repr(db.dsn))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    done = threading.Event()

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
        out, err = proc.communicate(timeout=90)
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
    )
    assert "clearing the cache of port" in out
    assert re.search(r"^port \d+ insert$", out, re.MULTILINE)
