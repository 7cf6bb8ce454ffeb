"""Reading a monitoring plugin's output the way Nagios and Icinga do, for the check's tests.

The format (Nagios plugin guidelines): one line, ``TEXT | PERFDATA``, where PERFDATA is
space-separated ``label=value[UOM];[warn];[crit];[min];[max]``, and a label with spaces
is single-quoted. The parser is strict, so a test fails on anything a monitoring system
would misread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PERF = re.compile(
    r"^(?P<label>'[^']+'|[^'= ]+)=(?P<value>-?\d+(?:\.\d+)?)(?P<uom>s|ms|us|%|B|KB|MB|TB|c)?"
    r"(?:;(?P<warn>[^; ]*))?(?:;(?P<crit>[^; ]*))?(?:;(?P<min>[^; ]*))?(?:;(?P<max>[^; ]*))?$"
)
_STATUS = re.compile(r"^PGHERALD (OK|WARNING|CRITICAL|UNKNOWN) - (.+)$")
CODES = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}


@dataclass(frozen=True)
class PerfValue:
    value: float
    uom: str
    warn: float | None
    crit: float | None


@dataclass(frozen=True)
class PluginOutput:
    state: str
    text: str
    perf: dict[str, PerfValue]


def _number(text: str | None) -> float | None:
    return float(text) if text else None


def parse(stdout: str) -> PluginOutput:
    lines = stdout.splitlines()
    assert len(lines) == 1, f"a plugin prints exactly one line, got {lines!r}"
    text, _, perfdata = lines[0].partition(" | ")
    found = _STATUS.match(text)
    assert found, f"not a status line: {text!r}"
    assert "|" not in found.group(2), text
    perf: dict[str, PerfValue] = {}
    for item in perfdata.split():
        m = _PERF.match(item)
        assert m, f"malformed performance data {item!r}"
        label = m.group("label").strip("'")
        assert label not in perf, f"label {label} twice"
        perf[label] = PerfValue(
            float(m.group("value")),
            m.group("uom") or "",
            _number(m.group("warn")),
            _number(m.group("crit")),
        )
    return PluginOutput(found.group(1), found.group(2), perf)
