"""Change events and messages for sink tests, without a database: the sinks only see
``Message``s, so events built by hand exercise them fully."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from pgherald.events import ChangeEvent, Operation, RowImage
from pgherald.events.formats import Format
from pgherald.sinks.base import Message, make_message

INT8, TEXT, NUMERIC = 20, 25, 1700
COLUMNS = {"id": (INT8, "int8"), "name": (TEXT, "text"), "amount": (NUMERIC, "numeric")}
SOURCE_URI = "pgherald://test"


def _load(type_oid: int, text: str) -> Any:
    return int(text) if type_oid == INT8 else text


def change(
    seq: int,
    *,
    row: int = 1,
    op: Operation = "insert",
    table: str = "orders",
    schema: str = "public",
    watch: str | None = None,
    name: str = "Zoë",
    old_row: int | None = None,
) -> ChangeEvent:
    """The ``seq``-th change, to row ``row`` (``old_row``: the key it had before an update)."""
    new: RowImage | None = RowImage.from_texts(
        COLUMNS, {"id": str(row), "name": f"{name} {seq}", "amount": f"{seq}.50"}, _load
    )
    old = None
    if op in ("update", "delete"):
        before = row if old_row is None else old_row
        old = RowImage.from_texts(
            COLUMNS, {"id": str(before), "name": f"{name} {seq - 1}", "amount": "0.00"}, _load
        )
    if op in ("delete", "truncate"):
        new = None
    return ChangeEvent(
        event_id=f"L/00000000{seq:08X}/{row}",
        watch=watch or table,
        op=op,
        schema=schema,
        table=table,
        key={} if op == "truncate" else {"id": row},
        old=old,
        new=new,
        changed=("name", "amount") if op == "update" else (),
        xid=700 + seq,
        position=f"0/{seq:X}",
        commit_time=datetime(2024, 5, 1, 12, 0, seq % 60, tzinfo=UTC),
        captured_at=datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC),
        method="logical",
        seq=seq,
        old_values="replica_identity" if old is not None else "none",
    )


def message(event: ChangeEvent, fmt: Format = "pgherald", log_id: int | None = None) -> Message:
    return make_message(event, log_id if log_id is not None else event.seq, fmt, SOURCE_URI)


def messages(events: list[ChangeEvent], fmt: Format = "pgherald") -> list[Message]:
    return [message(e, fmt) for e in events]


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], seconds: float = 60) -> T:
    """Runs a sink's coroutine to its end, failing after ``seconds`` rather than hanging."""

    async def bounded() -> T:
        async with asyncio.timeout(seconds):
            return await coro

    return asyncio.run(bounded())


def unique(what: str) -> str:
    """A name no other test run uses (exchanges, queues, streams on the shared brokers)."""
    return f"pgherald-test-{what}-{uuid.uuid4().hex[:10]}"
