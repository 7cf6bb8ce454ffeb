"""Initial snapshots of watched tables, consistent with the change stream.

A watch added with ``--snapshot`` starts with the table's current rows as ``read``
events. Reading a big table in one exported-snapshot transaction would hold back vacuum
for its whole duration and could not resume after a crash, so pgherald reads it in key
order, one chunk at a time, between two *watermarks* written into the WAL (the DBLog
method, also used by Debezium's incremental snapshots):

1. write a low watermark (a transactional logical message),
2. read the next chunk of rows (``WHERE key > last key ORDER BY key LIMIT n``),
3. write a high watermark.

When the stream reaches the low watermark it starts noting the keys of that table's
change events; at the high watermark, the chunk's rows *minus* the keys seen in between
are emitted as ``read`` events, in the same store transaction as the high watermark's
commit, together with the chunk's progress. A row changed while its chunk was read is
therefore represented by its change events (which are newer), never by a stale read.
After a crash the snapshot resumes after the last stored chunk.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgherald.db.sqlfiles import ident, named_query
from pgherald.db.types import output_text
from pgherald.events import RowImage
from pgherald.events.model import ColumnSpec, RowShape

WATERMARK_PREFIX = "pgherald.snapshot"
DONE = "done"


def progress_name(watch: str) -> str:
    """The checkpoint under which a watch's snapshot progress is stored."""
    return f"snapshot:{watch}"


def restart_progress(reason: str) -> str:
    """The progress that makes a watch's snapshot start again from its first row.

    Stored for every watch when the slot was recreated (see ``slot_safety``): the table is
    read again whether or not the watch asked for an initial snapshot, so that what changed
    while no slot kept the changes is represented by the rows as they are now.
    """
    return json.dumps({"last_key": None, "restart": reason})


@dataclass
class TableSnapshot:
    """The snapshot of one watch: where it is, and the chunk in flight."""

    watch: str
    schema: str
    table: str
    key_columns: tuple[str, ...]
    columns: tuple[str, ...] | None
    last_key: tuple[str | None, ...] | None = None
    done: bool = False
    chunk_id: str | None = None
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    shape: RowShape | None = None
    window_open: bool = False
    seen: set[tuple[Any, ...]] = field(default_factory=set)
    full_chunk: bool = False
    base_types: tuple[int, ...] = ()
    """The type of each column of ``shape``, domains resolved to their base type (whose output
    function prints them)."""

    @classmethod
    def resume(
        cls,
        watch: str,
        schema: str,
        table: str,
        key_columns: Sequence[str],
        columns: Sequence[str] | None,
        progress: str | None,
    ) -> TableSnapshot:
        snap = cls(watch, schema, table, tuple(key_columns), tuple(columns) if columns else None)
        if progress == DONE:
            snap.done = True
        elif progress:
            last_key = json.loads(progress).get("last_key")
            snap.last_key = tuple(last_key) if last_key is not None else None
        return snap

    @property
    def awaiting(self) -> bool:
        return self.chunk_id is not None

    def _shape(self, conn: psycopg.Connection[Any], type_names: TypeNamesFn) -> RowShape:
        rows = conn.execute(named_query("logical.sql", "chunk_columns"), (self.schema, self.table))
        wanted = set(self.columns) | set(self.key_columns) if self.columns else None
        cols = [(str(n), int(t), int(b)) for n, t, b in rows if wanted is None or n in wanted]
        names = type_names(t for _, t, _ in cols)
        self.base_types = tuple(b for _, _, b in cols)
        return RowShape(tuple(ColumnSpec(n, t, names.get(t, str(t))) for n, t, _ in cols))

    def read_chunk(
        self, conn: psycopg.Connection[Any], chunk_size: int, type_names: TypeNamesFn
    ) -> None:
        """Writes the low watermark, reads the next chunk, writes the high watermark.

        ``conn`` is in autocommit mode with the canonical session settings, so each step
        is its own transaction and the texts match what pgoutput sends.
        """
        self.shape = self._shape(conn, type_names)
        self.chunk_id = uuid.uuid4().hex
        self._watermark(conn, "low")
        # Key columns are qualified: a bare name in ORDER BY would bind to the *output* column
        # (the text), ordering 1, 10, 100, 2 ... instead of by the key's own type.
        select = sql.SQL("SELECT {cols} FROM {table} AS t{where} ORDER BY {key} LIMIT %s").format(
            # Each value as its type's output function prints it, as pgoutput sends it: a cast
            # to text would say ``true`` for ``t``, trim char(n) and add ``/32`` to an inet.
            cols=sql.SQL(", ").join(
                output_text(ident("t", n), base)
                for n, base in zip(self.shape.names, self.base_types, strict=True)
            ),
            table=ident(self.schema, self.table),
            where=sql.SQL(" WHERE ({}) > ({})").format(
                sql.SQL(", ").join(ident("t", k) for k in self.key_columns),
                sql.SQL(", ").join(sql.Placeholder() * len(self.key_columns)),
            )
            if self.last_key is not None
            else sql.SQL(""),
            key=sql.SQL(", ").join(ident("t", k) for k in self.key_columns),
        )
        params: list[Any] = [*(self.last_key or ()), chunk_size]
        self.rows = [tuple(r) for r in conn.execute(select, params).fetchall()]
        self.full_chunk = len(self.rows) == chunk_size
        self.seen.clear()
        self.window_open = False
        self._watermark(conn, "high")

    def _watermark(self, conn: psycopg.Connection[Any], mark: str) -> None:
        content = json.dumps({"watch": self.watch, "chunk": self.chunk_id, "mark": mark})
        conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (WATERMARK_PREFIX, content))

    def on_watermark(self, content: bytes) -> str | None:
        """Notes a watermark seen in the stream; returns ``"high"`` when the chunk can go out."""
        try:
            data = json.loads(content)
        except ValueError:
            return None
        if data.get("watch") != self.watch or data.get("chunk") != self.chunk_id:
            return None  # an old chunk's watermark, replayed after a restart
        if data.get("mark") == "low":
            self.window_open = True
            return "low"
        if data.get("mark") == "high" and self.window_open:
            return "high"
        return None

    def observe(self, key: Mapping[str, Any]) -> None:
        """A change event of this table passed while the chunk's window was open."""
        if self.window_open:
            self.seen.add(tuple(key.get(k) for k in self.key_columns))

    def invalidate(self) -> None:
        """The table was truncated while the chunk was read: read the chunk again."""
        if self.window_open:
            self.rows = []
            self.full_chunk = True

    def release(self) -> tuple[list[tuple[dict[str, Any], RowImage]], str]:
        """The chunk's surviving rows (key, image) and the progress to store with them."""
        assert self.shape is not None
        key_index = [self.shape.index(k) for k in self.key_columns]
        out = []
        for row in self.rows:
            key_tuple = tuple(row[i] for i in key_index)
            if key_tuple in self.seen:
                continue
            key = {k: row[i] for k, i in zip(self.key_columns, key_index, strict=True)}
            out.append((key, RowImage(self.shape, row)))
        if self.rows:
            last = self.rows[-1]
            self.last_key = tuple(last[i] for i in key_index)
        self.done = not self.full_chunk
        progress = DONE if self.done else json.dumps({"last_key": list(self.last_key or ())})
        self.rows = []
        self.seen.clear()
        self.window_open = False
        self.chunk_id = None
        return out, progress


TypeNamesFn = Callable[[Iterable[int]], Mapping[int, str]]
