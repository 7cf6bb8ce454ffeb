"""Snapshot comparison: what changed in a table, view or query since the last run.

Everything happens inside PostgreSQL, in the caller's transaction; at most the
differences reach Python:

1. The current result's columns are read (``LIMIT 0``); a shape that differs from the
   baseline's is recorded as a ``schema`` event, and the comparison uses the columns both
   share.
2. One pass over the result checks the key: no NULL, no duplicate (the offending keys
   are reported); it also counts the rows compared.
3. One ``FULL JOIN`` of the baseline with the result writes the differing rows into a
   temporary table (``pgherald_diff``): inserts, deletes, and updates with the names of
   the changed columns.
4. The baseline becomes the current result by applying the differences (or, after a
   shape change or without a key, by being rebuilt).
5. The differences become events: in the server, one ``INSERT ... SELECT`` from the
   difference table into the change log (``diff_events``, through the caller's
   ``emit_selected``), for a keyed comparison whose shape did not change; otherwise
   read in batches and turned into ``ChangeEvent``s in Python. Both make the same events.

The caller commits events, baseline and run record together: a failed or killed run
leaves the baseline as it was, and the next run compares against it again. Without a key,
rows are compared as a multiset of whole rows; such events say that rows are identified
by their content.

The baseline is an UNLOGGED table: bringing it up to date writes no WAL (it was most of
a run's WAL, as the few changed rows touch nearly every page). The price is that crash
recovery empties it (a server crash, a failover to a standby, a restore from a base
backup). The caller keeps the baseline's row count in a logged table, committed with the
run, and hands it to the next run: an empty baseline that should hold rows was lost, and
is recorded again from the current result, as a first run does, with nothing reported
(the state it held is gone, so the changes since the last run cannot be told) and
``RunOutcome.baseline_lost`` set for the caller to record why.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql

from pgherald.db.sqlfiles import named_query
from pgherald.db.types import CANONICAL_SESSION_SETTINGS, output_text
from pgherald.errors import CaptureError
from pgherald.events import ChangeEvent
from pgherald.events.model import ColumnSpec, RowImage, RowShape
from pgherald.sources.logical import describe_shape_change

_FILE: Final = "snapshot.sql"
FETCH_BATCH: Final = 5000

# How a column is compared, by type. The rule is PostgreSQL's text output (what every
# source stores): a value changed when its text output changed. Types whose ``=`` says
# exactly that are compared typed, which is fast; some are nearly so and get a cheap extra
# test (below); every other type is compared by its text output, which is exact for all of
# them (json has no ``=``, box compares areas, interval counts a day as 24 hours, citext and
# bpchar ignore what they ignore...).
_EXACT_EQUALITY: Final = frozenset(
    {
        16,  # bool
        17,  # bytea
        18,  # char
        20,  # int8
        21,  # int2
        23,  # int4
        26,  # oid
        1082,  # date
        1083,  # time
        1114,  # timestamp
        1184,  # timestamptz (printed in UTC: equal instants print alike)
        2950,  # uuid
    }
)
_NUMERIC: Final = 1700  # 1.0 = 1.00: equal, and of the same scale
_FLOATS: Final = frozenset({700, 701})  # -0 = 0: at zero, the texts decide
_STRINGS: Final = frozenset({19, 25, 1043})  # name, text, varchar: bytewise (COLLATE "C")
_TYPED_EQUALITY: Final = _EXACT_EQUALITY | _FLOATS | _STRINGS | {_NUMERIC}
"""Types compared typed; ``=`` can join their keys and a unique index can guard them."""


class SnapshotError(CaptureError):
    """A run that cannot compare (bad key, duplicate keys, missing key column)."""


def baseline_table(watch: str) -> str:
    """The name of a watch's baseline table in the store's schema."""
    return "snapshot_" + hashlib.sha256(watch.encode("utf-8")).hexdigest()[:20]


def baseline_checkpoint(watch: str) -> str:
    """The checkpoint that keeps a snapshot watch's baseline row count, for crash detection
    (it lives and goes with the baseline table)."""
    return f"snapshot:{watch}"


@dataclass(frozen=True)
class SnapshotWatch:
    """What one comparison needs: the SQL of the result and how rows are identified."""

    name: str
    query: str
    key_columns: tuple[str, ...] = ()
    ignore_columns: tuple[str, ...] = ()
    schema: str = ""
    table: str = ""
    """What the events name: the table or view, or ``""`` and the watch's name for a query."""
    initial_events: bool = False
    """Report the first run's rows (as ``read`` events) instead of only recording them."""

    @property
    def baseline(self) -> str:
        return baseline_table(self.name)


@dataclass
class RunOutcome:
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    rows_compared: int = 0
    baseline_created: bool = False
    baseline_lost: bool = False
    """The baseline was found emptied by a crash and recorded again (``baseline_created``)."""
    shape_changed: bool = False
    events: int = 0
    notes: list[str] = field(default_factory=list)


TypeNames = Callable[[Iterable[int]], Mapping[int, str]]
Emit = Callable[[Sequence[ChangeEvent]], None]
EmitSelected = Callable[[sql.Composable, Mapping[str, Any], Mapping[str, RowShape]], int]
"""Stores the events that a SELECT makes in the server (the columns ``store.selected``
names, its parameters, the shapes it names by label); returns how many it stored."""


def _q(name: str) -> sql.SQL:
    return sql.SQL(named_query(_FILE, name))


def _col(alias: str, name: str) -> sql.Composable:
    return sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(name))


_NUMERIC_DIFFER: Final = sql.SQL(
    "({0} IS DISTINCT FROM {1} OR scale({0}) IS DISTINCT FROM scale({1}))"
)
_FLOAT_DIFFER: Final = sql.SQL("({0} IS DISTINCT FROM {1} OR ({0} = 0 AND {0}::text <> {1}::text))")


def _text(a: sql.Composable, type_oid: int) -> sql.Composable:
    """``a``'s text output, as every source stores it (NULL stays NULL)."""
    return output_text(a, type_oid)


def _typed(type_a: int, type_b: int) -> bool:
    return type_a == type_b and type_a in _TYPED_EQUALITY


def _same(a: sql.Composable, b: sql.Composable, type_a: int, type_b: int) -> sql.Composable:
    """``a`` and ``b`` hold the same key (never NULL there), as the key's ``=`` sees it."""
    if _typed(type_a, type_b):
        return sql.SQL("{} = {}").format(a, b)
    return sql.SQL("{} = {}").format(_text(a, type_a), _text(b, type_b))


def _differ(a: sql.Composable, b: sql.Composable, type_a: int, type_b: int) -> sql.Composable:
    """``a`` and ``b`` differ in their text output (NULL and NULL do not)."""
    if not _typed(type_a, type_b):
        return sql.SQL("{} IS DISTINCT FROM {}").format(_text(a, type_a), _text(b, type_b))
    if type_a == _NUMERIC:
        return _NUMERIC_DIFFER.format(a, b)
    if type_a in _FLOATS:
        return _FLOAT_DIFFER.format(a, b)
    if type_a in _STRINGS:
        return sql.SQL('{} COLLATE "C" IS DISTINCT FROM {} COLLATE "C"').format(a, b)
    return sql.SQL("{} IS DISTINCT FROM {}").format(a, b)


def _groupable(a: sql.Composable, type_oid: int) -> sql.Composable:
    return a if type_oid in _TYPED_EQUALITY else _text(a, type_oid)


class SnapshotComparer:
    """Runs comparisons in a store; one instance serves many watches and runs."""

    def __init__(self, store: str, type_names: TypeNames) -> None:
        self.store = store
        self.type_names = type_names

    # -- shapes --------------------------------------------------------------------------

    def current_columns(
        self, conn: psycopg.Connection[Any], watch: SnapshotWatch
    ) -> list[tuple[str, int]]:
        """The result's columns (ignored ones left out), as ``(name, type_oid)``."""
        cur = conn.execute(_q("probe").format(query=sql.SQL(watch.query)))
        assert cur.description is not None
        found = [(d.name, int(d.type_code)) for d in cur.description]
        names = [n for n, _ in found]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SnapshotError(
                f"watch {watch.name!r}: the result has several columns named"
                f" {', '.join(map(repr, dup))}; give them distinct names (AS ...)"
            )
        kept = [(n, t) for n, t in found if n not in watch.ignore_columns]
        missing = [k for k in watch.key_columns if k not in {n for n, _ in kept}]
        if missing:
            raise SnapshotError(
                f"watch {watch.name!r}: key column(s) {', '.join(map(repr, missing))} are not"
                " in the result; change the query or re-create the watch with a valid --key"
            )
        return kept

    def baseline_columns(
        self, conn: psycopg.Connection[Any], watch: SnapshotWatch
    ) -> list[tuple[str, int]] | None:
        rows = conn.execute(
            named_query(_FILE, "baseline_columns"),
            {"store": self.store, "table": watch.baseline},
        ).fetchall()
        return [(r[0], int(r[1])) for r in rows] or None

    def _shape(self, columns: Sequence[tuple[str, int]]) -> RowShape:
        names = self.type_names(t for _, t in columns)
        return RowShape(tuple(ColumnSpec(n, t, names.get(t, str(t))) for n, t in columns))

    # -- a run ---------------------------------------------------------------------------

    def run(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        run_id: int,
        emit: Emit,
        captured_at: datetime,
        baseline_rows: int | None = None,
        emit_selected: EmitSelected | None = None,
    ) -> RunOutcome:
        """Compares and updates the baseline in ``conn``'s open transaction; events go to
        ``emit`` in batches. The caller commits (or rolls back) everything.

        With ``emit_selected``, the differences of a keyed comparison whose shape did not
        change (nearly every run) become events in the server, in one statement from the
        difference table, instead of coming to Python and going back: the same events,
        without reading, decoding, building and writing each one (about half of a run's
        work beyond the comparison itself).

        ``baseline_rows`` is how many rows the baseline held when the last run committed
        (``RunOutcome.rows_compared``, kept by the caller in a logged table), or ``None``
        where nothing was kept; it tells a baseline that a crash emptied from one that is
        empty because the result was."""
        self._canonical(conn)
        current = self.current_columns(conn, watch)
        before = self.baseline_columns(conn, watch)
        out = RunOutcome()
        events = _EventMaker(watch, run_id, captured_at, conn)
        unlogged = before is not None and self._unlogged(conn, watch)
        lost = before is not None and unlogged and self._lost(conn, watch, baseline_rows)
        # A run that keeps its baseline knows how many rows it compares without counting
        # them (a pass over the whole result): the baseline's count, kept by the last run,
        # plus the inserts, minus the deletes (keyed or as a multiset alike).
        derived = before is not None and not lost and baseline_rows is not None
        counted = self._check_keys(conn, watch, current, count=not derived)
        out.rows_compared = counted if counted is not None else 0
        if lost:
            # What the baseline held is gone: nothing to compare with, so this run records
            # it again, as a first run does, and reports no change rather than every row.
            self._rebuild(conn, watch, current)
            out.baseline_created = out.baseline_lost = True
            out.notes.append(
                "the baseline was lost (an UNLOGGED table, emptied by a server crash or a"
                f" failover; it held {baseline_rows if baseline_rows is not None else 'some'}"
                " rows): recorded again; changes since the last run are not reported"
            )
            return out
        if before is None:
            self._rebuild(conn, watch, current)
            out.baseline_created = True
            if watch.initial_events:
                shape = self._shape(current)
                by_key: list[sql.Composable] = [sql.Identifier(k) for k in watch.key_columns]
                for batch in self._fetch(conn, _q("read_baseline"), watch, current, (), by_key):
                    made = [events.read(shape, r) for r in batch]
                    out.events += len(made)
                    emit(made)
            return out
        old_shape, new_shape = self._shape(before), self._shape(current)
        if old_shape != new_shape:
            out.shape_changed = True
            emit([events.schema(describe_shape_change(old_shape, new_shape))])
            out.events += 1
        before_names = {n for n, _ in before}
        shared = [(n, t) for n, t in current if n in before_names]
        if watch.key_columns:
            missing = [k for k in watch.key_columns if k not in before_names]
            if missing:
                # The baseline predates the key: nothing can be matched; start again.
                if counted is None:
                    out.rows_compared = self._count(conn, watch, current)
                self._rebuild(conn, watch, current)
                out.notes.append("the baseline lacked the key columns: it was recorded again")
                return out
            self._keyed_diff(conn, watch, before, current, shared)
            # The baseline first, the events last: appending holds the change log's
            # append lock until the commit, so it should come as late as it can.
            if out.shape_changed:
                self._rebuild(conn, watch, current)
            else:
                self._apply(conn, watch, current)
                if not unlogged:
                    conn.execute(_q("unlog_baseline").format(baseline=self._baseline(watch)))
                    out.notes.append("the baseline table was made UNLOGGED")
            order: list[sql.Composable] = [
                sql.SQL("coalesce({}::text, {}::text)").format(
                    sql.Identifier(f"k_{i}"),
                    sql.Identifier(f"n_{[n for n, _ in current].index(k)}"),
                )
                for i, k in enumerate(watch.key_columns)
            ]
            if emit_selected is not None and not out.shape_changed:
                self._select_events(
                    conn,
                    watch,
                    run_id,
                    captured_at,
                    current,
                    before,
                    order,
                    new_shape,
                    emit_selected,
                    out,
                )
            else:
                self._python_events(conn, watch, current, before, order, events, emit, out)
        else:
            self._multiset_diff(conn, watch, before, shared)
            self._rebuild(conn, watch, current)
            shared_shape = self._shape([(n, dict(current)[n]) for n, _ in shared])
            for batch in self._fetch_multiset(conn, shared):
                made = events.multiset(shared_shape, batch)
                out.inserts += sum(1 for e in made if e.op == "insert")
                out.deletes += sum(1 for e in made if e.op == "delete")
                out.events += len(made)
                if made:
                    emit(made)
        if counted is None and baseline_rows is not None:
            out.rows_compared = baseline_rows + out.inserts - out.deletes
        return out

    def _python_events(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        current: Sequence[tuple[str, int]],
        before: Sequence[tuple[str, int]],
        order: Sequence[sql.Composable],
        events: _EventMaker,
        emit: Emit,
        out: RunOutcome,
    ) -> None:
        """The difference table's rows, read in batches, become events in Python."""
        old_shape, new_shape = self._shape(before), self._shape(current)
        for batch in self._fetch(conn, _q("read_diff"), watch, current, before, order):
            made = events.diff(old_shape, new_shape, batch)
            for e in made:
                if e.op == "insert":
                    out.inserts += 1
                elif e.op == "delete":
                    out.deletes += 1
                else:
                    out.updates += 1
            out.events += len(made)
            if made:
                emit(made)

    def _canonical(self, conn: psycopg.Connection[Any]) -> None:
        """The text output every source stores (UTC, ISO dates...), for this transaction."""
        for name, value in CANONICAL_SESSION_SETTINGS.items():
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))

    def _cur(self, watch: SnapshotWatch, columns: Sequence[tuple[str, int]]) -> sql.Composable:
        """The result restricted to the compared columns, as a subquery."""
        return _q("current").format(
            columns=sql.SQL(", ").join(_col("q", n) for n, _ in columns),
            query=sql.SQL(watch.query),
        )

    def _baseline(self, watch: SnapshotWatch) -> sql.Identifier:
        return sql.Identifier(self.store, watch.baseline)

    def _count(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        current: Sequence[tuple[str, int]],
    ) -> int:
        row = conn.execute(_q("count_rows").format(current=self._cur(watch, current))).fetchone()
        return int(row[0]) if row else 0

    def _check_keys(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        current: Sequence[tuple[str, int]],
        count: bool = True,
    ) -> int | None:
        """Counts the result's rows, and refuses NULL or duplicate keys, naming some.

        Where the watched table itself guarantees the key (NOT NULL columns, a unique
        index on them), counting is enough: grouping a million keys is most of the cost
        of a run that finds few changes. Without ``count``, such a result is not even
        counted (``None``): the caller knows the count otherwise."""
        if not watch.key_columns or self._key_guaranteed(conn, watch):
            return self._count(conn, watch, current) if count else None
        types = dict(current)
        keys = [
            sql.SQL("{} AS {}").format(_groupable(_col("c", k), types[k]), sql.Identifier(f"g_{i}"))
            for i, k in enumerate(watch.key_columns)
        ]
        texts = [
            _text(_col("g", f"g_{i}"), types[k] if types[k] in _TYPED_EQUALITY else 25)
            for i, k in enumerate(watch.key_columns)
        ]
        row = conn.execute(
            _q("check_keys").format(
                current=self._cur(watch, current),
                keys=sql.SQL(", ").join(keys),
                group=sql.SQL(", ").join(
                    sql.Identifier(f"g_{i}") for i in range(len(watch.key_columns))
                ),
                key_texts=sql.SQL(", ").join(texts),
                any_null=sql.SQL(" OR ").join(
                    sql.SQL("{} IS NULL").format(_col("c", k)) for k in watch.key_columns
                ),
            )
        ).fetchone()
        assert row is not None
        total, offenders = int(row[0] or 0), row[1] or []
        if offenders:
            parts = []
            for *values, count in offenders:
                key = ", ".join(
                    f"{k}={'NULL' if v is None else repr(v)}"
                    for k, v in zip(watch.key_columns, values, strict=True)
                )
                parts.append(key + (f" ({count} rows)" if int(count) > 1 else ""))
            shown = "; ".join(parts)
            raise SnapshotError(
                f"watch {watch.name!r}: the key ({', '.join(watch.key_columns)}) does not"
                f" identify one row: {shown}"
            )
        return total

    def _unlogged(self, conn: psycopg.Connection[Any], watch: SnapshotWatch) -> bool:
        row = conn.execute(
            named_query(_FILE, "baseline_persistence"),
            {"store": self.store, "table": watch.baseline},
        ).fetchone()
        return bool(row and row[0] == "u")

    def _lost(
        self, conn: psycopg.Connection[Any], watch: SnapshotWatch, recorded: int | None
    ) -> bool:
        """Whether an UNLOGGED baseline was emptied by crash recovery: it is empty, and the
        last run recorded rows in it (or recorded nothing, which no baseline that a run
        made UNLOGGED lacks: it is committed with the table)."""
        if recorded == 0:
            return False
        row = conn.execute(_q("baseline_has_rows").format(baseline=self._baseline(watch)))
        found = row.fetchone()
        return not (found and found[0])

    def _key_guaranteed(self, conn: psycopg.Connection[Any], watch: SnapshotWatch) -> bool:
        """Whether the watched table (not a view or query) makes the key unique and not NULL."""
        if not watch.schema:
            return False
        row = conn.execute(
            named_query(_FILE, "key_guaranteed"),
            {"schema": watch.schema, "table": watch.table, "keys": list(watch.key_columns)},
        ).fetchone()
        return bool(row and row[0])

    def _rebuild(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        current: Sequence[tuple[str, int]],
    ) -> None:
        """Makes the baseline exactly the current result (first run, shape change, multiset)."""
        table = self._baseline(watch)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        conn.execute(_q("create_baseline").format(table=table, current=self._cur(watch, current)))
        types = dict(current)
        if watch.key_columns and all(types[k] in _TYPED_EQUALITY for k in watch.key_columns):
            conn.execute(
                sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(
                    table, sql.SQL(", ").join(sql.Identifier(k) for k in watch.key_columns)
                )
            )

    def _keyed_diff(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        before: Sequence[tuple[str, int]],
        current: Sequence[tuple[str, int]],
        shared: Sequence[tuple[str, int]],
    ) -> None:
        types, before_types = dict(current), dict(before)
        keys = watch.key_columns
        # A key whose ``=`` is not exact (1.0 = 1.00) can match a row whose key's text
        # changed: such keys are compared like the other columns.
        compared = [
            (n, t)
            for n, t in shared
            if n not in keys or (_typed(before_types[n], t) and t not in _EXACT_EQUALITY)
        ]
        differs = [_differ(_col("b", n), _col("c", n), before_types[n], t) for n, t in compared]
        conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.pgherald_diff"))
        conn.execute(
            _q("keyed_diff").format(
                b_key=_col("b", keys[0]),
                c_key=_col("c", keys[0]),
                changed=sql.SQL(", ").join(
                    [
                        sql.SQL("CASE WHEN {} THEN {} END").format(d, sql.Literal(n))
                        for d, (n, _) in zip(differs, compared, strict=True)
                    ]
                )
                if differs
                else sql.SQL("NULL"),
                old_keys=sql.SQL(", ").join(
                    sql.SQL("{} AS {}").format(_col("b", k), sql.Identifier(f"k_{i}"))
                    for i, k in enumerate(keys)
                ),
                b_ctid=_col("b", "ctid"),
                old_values=sql.SQL(", ").join(
                    sql.SQL("{} AS {}").format(_text(_col("b", n), t), sql.Identifier(f"o_{i}"))
                    for i, (n, t) in enumerate(before)
                ),
                new_values=sql.SQL(", ").join(
                    sql.SQL("{} AS {}").format(_col("c", n), sql.Identifier(f"n_{i}"))
                    for i, (n, _) in enumerate(current)
                ),
                baseline=self._baseline(watch),
                current=self._cur(watch, current),
                join=sql.SQL(" AND ").join(
                    _same(_col("b", k), _col("c", k), before_types[k], types[k]) for k in keys
                ),
                any_differs=sql.SQL(" OR ").join(differs) if differs else sql.SQL("false"),
            )
        )

    def _apply(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        current: Sequence[tuple[str, int]],
    ) -> None:
        table = self._baseline(watch)
        conn.execute(_q("apply_deletes").format(baseline=table))
        conn.execute(
            _q("apply_inserts").format(
                baseline=table,
                columns=sql.SQL(", ").join(sql.Identifier(n) for n, _ in current),
                values=sql.SQL(", ").join(sql.Identifier(f"n_{i}") for i in range(len(current))),
            )
        )

    def _select_events(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        run_id: int,
        captured_at: datetime,
        current: Sequence[tuple[str, int]],
        before: Sequence[tuple[str, int]],
        order: Sequence[sql.Composable],
        shape: RowShape,
        emit_selected: EmitSelected,
        out: RunOutcome,
    ) -> None:
        """The difference table's rows become events in the server (``diff_events``)."""
        for op, n in conn.execute(_q("count_diff")).fetchall():
            if op == "insert":
                out.inserts += int(n)
            elif op == "delete":
                out.deletes += int(n)
            else:
                out.updates += int(n)
        if not (out.inserts or out.updates or out.deletes):
            return
        types = dict(current)
        names, before_names = [n for n, _ in current], [n for n, _ in before]

        def key_text(k: str) -> sql.Composable:
            old = sql.Identifier("d", f"o_{before_names.index(k)}")
            new = _text(sql.Identifier("d", f"n_{names.index(k)}"), types[k])
            return sql.SQL(
                "coalesce(to_json(CASE WHEN d.op = 'delete' THEN {} ELSE {} END)::text, 'null')"
            ).format(old, new)

        rows = _q("diff_events").format(
            row_key=sql.SQL(" || ',' || ").join(key_text(k) for k in watch.key_columns),
            old_texts=sql.SQL(", ").join(sql.Identifier("d", f"o_{i}") for i in range(len(before))),
            new_texts=sql.SQL(", ").join(
                _text(sql.Identifier("d", f"n_{i}"), t) for i, (_, t) in enumerate(current)
            ),
            order=sql.SQL(", ").join(order),
        )
        params = {
            "run": run_id,
            "watch": watch.name,
            "schema_name": watch.schema,
            "table_name": watch.table or watch.name,
            "key_columns": list(watch.key_columns),
            "captured_at": captured_at,
        }
        conn.execute(named_query(_FILE, "sort_in_memory"))
        out.events += emit_selected(rows, params, {"row": shape})

    def _fetch(
        self,
        conn: psycopg.Connection[Any],
        statement: sql.SQL,
        watch: SnapshotWatch,
        current: Sequence[tuple[str, int]],
        before: Sequence[tuple[str, int]],
        order: Sequence[sql.Composable],
    ) -> Iterable[list[tuple[Any, ...]]]:
        """Rows of the diff (or of the new baseline) in batches, through a server-side cursor,
        so that memory holds one batch whatever the size of the difference."""
        composed = statement.format(
            baseline=self._baseline(watch),
            new_texts=sql.SQL(", ").join(
                _text(sql.Identifier(f"n_{i}"), t) for i, (_, t) in enumerate(current)
            ),
            base_texts=sql.SQL(", ").join(_text(sql.Identifier(n), t) for n, t in current),
            old_texts=sql.SQL(", ").join(sql.Identifier(f"o_{i}") for i in range(len(before)))
            or sql.SQL("NULL"),
            order=sql.SQL(", ").join(order) if order else sql.SQL("1"),
        )
        with conn.cursor(name="pgherald_snapshot_fetch") as cur:
            cur.itersize = FETCH_BATCH
            cur.execute(composed)
            while batch := cur.fetchmany(FETCH_BATCH):
                yield batch

    def _multiset_diff(
        self,
        conn: psycopg.Connection[Any],
        watch: SnapshotWatch,
        before: Sequence[tuple[str, int]],
        shared: Sequence[tuple[str, int]],
    ) -> None:
        names = [n for n, _ in shared]
        before_types = dict(before)
        texts = [sql.Identifier(f"t_{i}") for i in range(len(names))]
        conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.pgherald_diff"))
        conn.execute(
            _q("multiset_diff").format(
                texts=sql.SQL(", ").join(texts) if texts else sql.SQL("NULL::text AS t_0"),
                group=sql.SQL(", ").join(texts) if texts else sql.SQL("1"),
                b_texts=sql.SQL(", ").join(
                    sql.SQL("{} AS {}").format(_text(_col("b", n), before_types[n]), t)
                    for n, t in zip(names, texts, strict=True)
                )
                or sql.SQL("NULL::text AS t_0"),
                c_texts=sql.SQL(", ").join(_text(_col("c", n), t) for n, t in shared)
                or sql.SQL("NULL::text"),
                baseline=self._baseline(watch),
                current=self._cur(watch, shared),
            )
        )

    def _fetch_multiset(
        self, conn: psycopg.Connection[Any], shared: Sequence[tuple[str, int]]
    ) -> Iterable[list[tuple[Any, ...]]]:
        with conn.cursor(name="pgherald_snapshot_fetch") as cur:
            cur.itersize = FETCH_BATCH
            cur.execute(_q("read_multiset"))
            while batch := cur.fetchmany(FETCH_BATCH):
                yield batch


class _EventMaker:
    """Events of one run: ids ``S/<run>/<n>`` are stable, so a replayed run is harmless."""

    def __init__(self, watch: SnapshotWatch, run_id: int, captured_at: datetime, conn: Any) -> None:
        self.watch = watch
        self.run_id = run_id
        self.captured_at = captured_at
        self.seq = 0
        row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        self.xid = int(row[0]) if row else None

    def _event(
        self,
        op: Any,
        key: Mapping[str, Any],
        old: RowImage | None,
        new: RowImage | None,
        changed: tuple[str, ...] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> ChangeEvent:
        self.seq += 1
        w = self.watch
        return ChangeEvent(
            event_id=f"S/{self.run_id}/{self.seq}",
            watch=w.name,
            op=op,
            schema=w.schema,
            table=w.table or w.name,
            key=key,
            old=old,
            new=new,
            changed=changed,
            xid=self.xid,
            position=str(self.run_id),
            commit_time=self.captured_at,
            captured_at=self.captured_at,
            method="snapshot",
            seq=self.seq,
            old_values="snapshot" if old is not None else "none",
            meta=meta or {},
        )

    def _key(self, image: RowImage) -> dict[str, Any]:
        return {k: image.text(k) for k in self.watch.key_columns}

    def schema(self, description: Mapping[str, Any]) -> ChangeEvent:
        return self._event("schema", {}, None, None, meta=description)

    def read(self, shape: RowShape, row: tuple[Any, ...]) -> ChangeEvent:
        image = RowImage(shape, tuple(row))
        return self._event("read", self._key(image), None, image, meta={"baseline": True})

    def diff(
        self, old_shape: RowShape, new_shape: RowShape, batch: Sequence[tuple[Any, ...]]
    ) -> list[ChangeEvent]:
        out = []
        n_old, n_new = len(old_shape), len(new_shape)
        for row in batch:
            op = row[0]
            changed = tuple(row[1] or ()) if op == "update" else ()
            old_texts = tuple(row[2 : 2 + n_old])
            new_texts = tuple(row[2 + n_old : 2 + n_old + n_new])
            old = RowImage(old_shape, old_texts) if op != "insert" else None
            new = RowImage(new_shape, new_texts) if op != "delete" else None
            image = new if new is not None else old
            assert image is not None
            out.append(self._event(op, self._key(image), old, new, changed))
        return out

    def multiset(self, shape: RowShape, batch: Sequence[tuple[Any, ...]]) -> list[ChangeEvent]:
        out = []
        meta = {"identified_by": "content"}
        for row in batch:
            *texts, n = row
            image = RowImage(shape, tuple(texts[: len(shape)]))
            for _ in range(abs(int(n))):
                if n > 0:
                    out.append(self._event("insert", {}, None, image, meta=meta))
                else:
                    out.append(self._event("delete", {}, image, None, meta=meta))
        return out
