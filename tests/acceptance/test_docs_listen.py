"""The examples of docs/how-to/listen-to-channels.md run, and print what the page says."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pgherald.cli_listen import as_json_line
from pgherald.sources.listen import Notification
from tests.acceptance._cli import WORKDIR, clean_env
from tests.conftest import Database

PAGE = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "listen-to-channels.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(PAGE.read_text())]


def examples() -> list[tuple[str, str]]:
    """Each python block with the text block that follows it (what it prints)."""
    found = blocks()
    pairs = []
    for i, (kind, code) in enumerate(found):
        if kind == "python":
            assert i + 1 < len(found) and found[i + 1][0] == "text", "no output shown after"
            pairs.append((code, found[i + 1][1]))
    return pairs


def test_the_page_has_examples() -> None:
    assert len(examples()) == 2


@pytest.mark.parametrize("index", range(2))
def test_the_python_examples_print_what_the_page_says(db: Database, index: int) -> None:
    code, expected = examples()[index]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=clean_env({"PGHERALD_DSN": db.dsn}),
        cwd=WORKDIR,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


def test_the_command_line_example_shows_the_real_format() -> None:
    console = next(code for kind, code in blocks() if kind == "console" and "listen" in code)
    shown = [json.loads(line) for line in console.splitlines() if line.startswith("{")]
    assert shown
    real = json.loads(as_json_line(Notification("c", "p", 1), datetime.now(UTC)))
    for line in shown:
        assert list(line) == list(real)
        assert datetime.fromisoformat(line["received_at"]).utcoffset() is not None
