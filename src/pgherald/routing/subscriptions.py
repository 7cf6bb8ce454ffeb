"""Who gets what: a subscription's filter, decided per event without any I/O.

A subscription sends one watch's events to one sink. Its filter can keep only some
operations (``ops``), only updates that changed some columns (``columns``), only rows
whose values satisfy a condition (``where``, see ``conditions``), and ignore columns
(an update that changed only ignored columns is not delivered). The stored form is the
``filter`` JSON of the ``subscriptions`` table: ``{"ops": [...], "columns": [...],
"where": "..."}``; every part is optional.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pgherald.errors import ConfigError
from pgherald.events import ChangeEvent
from pgherald.events.model import OPERATIONS
from pgherald.routing.conditions import Condition, parse


@dataclass(frozen=True)
class Subscription:
    """A subscription as the router applies it."""

    sink: str
    watch: str
    ops: frozenset[str] | None = None
    columns: frozenset[str] | None = None
    where: Condition | None = None
    ignore_columns: frozenset[str] = frozenset()
    strictly_ordered: bool = False

    @classmethod
    def from_filter(
        cls,
        sink: str,
        watch: str,
        filter: Mapping[str, Any],
        ignore_columns: Sequence[str] = (),
        strictly_ordered: bool = False,
    ) -> Subscription:
        """Builds a subscription from its stored filter; a bad filter is one ConfigError."""
        unknown = sorted(set(filter) - {"ops", "columns", "where"})
        if unknown:
            raise ConfigError(f"subscription filter has unknown key(s) {', '.join(unknown)}")
        ops = filter.get("ops")
        if ops is not None:
            bad = sorted(set(ops) - set(OPERATIONS))
            if bad or not ops:
                raise ConfigError(
                    f"unknown operation(s) {', '.join(map(repr, bad))};"
                    f" use some of {', '.join(OPERATIONS)}"
                    if bad
                    else "--ops is empty"
                )
        columns = filter.get("columns")
        where = filter.get("where")
        return cls(
            sink=sink,
            watch=watch,
            ops=frozenset(ops) if ops is not None else None,
            columns=frozenset(columns) if columns else None,
            where=parse(where) if where else None,
            ignore_columns=frozenset(ignore_columns),
            strictly_ordered=strictly_ordered,
        )

    def to_filter(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.ops is not None:
            out["ops"] = sorted(self.ops)
        if self.columns:
            out["columns"] = sorted(self.columns)
        if self.where is not None:
            out["where"] = str(self.where)
        return out

    def wants(self, event: ChangeEvent) -> bool:
        """Whether this event goes to the sink."""
        if event.watch != self.watch:
            return False
        if self.ops is not None and event.op not in self.ops:
            return False
        if event.op == "update" and event.changed:
            changed = [c for c in event.changed if c not in self.ignore_columns]
            if not changed:
                return False  # only ignored columns changed
            if self.columns is not None and not self.columns.intersection(changed):
                return False
        if self.where is not None:
            row = event.new if event.new is not None else event.old
            if row is None:
                return False  # truncate, schema: no row to test
            return self.where.matches(row)
        return True


def order_key(event: ChangeEvent) -> str:
    """The row an event belongs to: events with the same key reach a sink in log order.

    Table-wide events (truncate, schema) and keyless rows share their watch's key.
    """
    if not event.key:
        return event.watch
    return event.watch + "\x1f" + json.dumps(sorted(event.key.items()), default=str)
