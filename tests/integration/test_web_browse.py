"""The change browser's pages: keyset paging through indexes, bounded work per request on a
large log (proved with EXPLAIN ANALYZE), and exactly the matching events, page after page."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgherald.config import Settings
from pgherald.db.sqlfiles import named_query
from pgherald.store import browse
from pgherald.store.changelog import ChangeLog
from pgherald.store.session import in_schema
from tests.conftest import Database
from tests.integration.web_support import append, event, store

EVENTS = 1_000_000
WATCHES = 20  # w00 .. w19; w19 is rare (one event in a thousand)
START = datetime(2024, 1, 1, tzinfo=UTC)


def _fill(db: Database, settings: Settings, total: int) -> None:
    """``total`` events straight into the log (COPY-speed SQL), shaped like real ones."""
    append(db, settings, [event(0, "w00")])
    with db.connect() as conn:
        conn.execute(
            """
            INSERT INTO pgherald.events (event_id, watch, op, schema_name, table_name, row_key,
                key_columns, shape_id, new_values, old_values, changed, xid, position,
                commit_time, captured_at, method)
            SELECT 'G/' || i,
                   CASE WHEN i %% 1000 = 0 THEN 'w19' ELSE 'w' || lpad((i %% 19)::text, 2, '0') END,
                   CASE WHEN i %% 997 = 0 THEN 'delete' WHEN i %% 3 = 0 THEN 'insert'
                        ELSE 'update' END,
                   'public', 't', '["' || (i %% 5000) || '"]', '{id}',
                   (SELECT min(id) FROM pgherald.shapes),
                   ARRAY[(i %% 5000)::text, 'name ' || i, CASE WHEN i %% 50000 = 7 THEN 'needle'
                         ELSE 'hay' END],
                   ARRAY[(i %% 5000)::text, 'old ' || i, 'hay'],
                   '{name}', i, i::text,
                   %(start)s::timestamptz + i * interval '1 second',
                   %(start)s::timestamptz + i * interval '1 second',
                   'trigger'
            FROM generate_series(1, %(total)s) AS i
            """,
            {"start": START, "total": total},
        )
        conn.execute("ANALYZE pgherald.events")


@pytest.fixture(scope="module")
def big() -> Iterator[tuple[Database, Settings]]:
    from tests.conftest import PRIMARY, _drop_database, _new_database, cluster_for

    database = _new_database(cluster_for(PRIMARY))
    settings = store(database, [f"w{i:02d}" for i in range(WATCHES)])
    _fill(database, settings, EVENTS)
    yield database, settings
    _drop_database(database)


def _plan(conn: psycopg.Connection[Any], name: str, params: dict[str, Any]) -> dict[str, Any]:
    with in_schema(conn, "pgherald"):
        row = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + named_query("web.sql", name),
            params,
        ).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _events_reads(plan: dict[str, Any]) -> list[tuple[str, str | None, int]]:
    """(node type, index, rows read incl. filtered out, all loops) of scans of ``events``."""
    out = []
    for node in _nodes(plan):
        if node.get("Relation Name") == "events":
            read = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node[
                "Actual Loops"
            ]
            out.append((node["Node Type"], node.get("Index Name"), int(read)))
    return out


def _params(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "before": browse.NEWEST,
        "floor": 0,
        "limit": 51,
        "op": None,
        "since": None,
        "until": None,
        "q": None,
    }
    base.update(kw)
    return base


def test_pages_read_through_indexes_and_only_what_they_show(big: tuple[Database, Settings]) -> None:
    db, _ = big
    with db.connect() as conn:
        deep = EVENTS // 3
        cases: list[tuple[str, dict[str, Any], str, int]] = [
            ("page_all", _params(), "events_pkey", 51),
            ("page_all", _params(before=deep), "events_pkey", 51),
            ("page_watches", _params(watches=["w03"]), "events_watch_id_idx", 51),
            ("page_watches", _params(watches=["w03"], before=deep), "events_watch_id_idx", 51),
            ("page_watches", _params(watches=["w19"]), "events_watch_id_idx", 51),
            # a viewer's several watches: each read through its index, at most a page each
            ("page_watches", _params(watches=["w01", "w02", "w19"]), "events_watch_id_idx", 153),
            (
                "page_row",
                _params(watch="w05", row_key='["4000"]', before=deep),
                "events_watch_row_key_idx",
                51,
            ),
        ]
        for name, params, index, most in cases:
            plan = _plan(conn, name, params)
            reads = _events_reads(plan)
            assert reads, name
            for node_type, used, read in reads:
                assert node_type in ("Index Scan", "Index Only Scan"), (name, node_type)
                assert used == index, (name, used)
                assert read <= most, (name, params, read)
            assert not any(n["Node Type"] == "Seq Scan" for n in _nodes(plan)), name


def test_filters_no_index_serves_read_one_window_at_most(big: tuple[Database, Settings]) -> None:
    db, _ = big
    window = 20_000
    with db.connect() as conn:
        floors: list[tuple[str, dict[str, Any]]] = [
            ("floor_all", {"before": browse.NEWEST, "window": window}),
            ("floor_watches", {"watches": ["w07", "w19"], "before": browse.NEWEST}),
        ]
        for name, params in floors:
            params["window"] = window
            plan = _plan(conn, name, params)
            reads = _events_reads(plan)
            assert all(t == "Index Only Scan" for t, _, _ in reads), (name, reads)
            assert sum(r for _, _, r in reads) <= 2 * window, (name, reads)
        # the page itself stays above the floor: a rare operation costs a window, not the log
        floor = EVENTS + 2 - window  # ids run from 1 to EVENTS + 1: one window above it
        plan = _plan(conn, "page_all", _params(floor=floor, op="delete", q="needle"))
        reads = _events_reads(plan)
        assert reads and all(t == "Index Scan" for t, _, _ in reads)
        assert sum(r for _, _, r in reads) <= window


def test_every_page_is_quick_on_a_million_events(big: tuple[Database, Settings]) -> None:
    db, settings = big
    with db.connect() as conn:
        log = ChangeLog(conn, settings.schema)
        slowest = 0.0
        for filters in [
            browse.Filters(),
            browse.Filters(watches=("w19",)),
            browse.Filters(watches=("w01", "w19")),
            browse.Filters(op="delete"),
            browse.Filters(text="needle"),
            browse.Filters(watches=("w05",), row_key='["4000"]'),
            browse.Filters(since=START + timedelta(seconds=EVENTS // 2)),
        ]:
            before = browse.NEWEST
            for _ in range(3):
                started = time.perf_counter()
                found = browse.page(log, filters, before)
                slowest = max(slowest, time.perf_counter() - started)
                if found.older is None:
                    break
                before = found.older
        # generous for a shared 2-core machine; a scan of the log takes seconds
        print(f"slowest page: {slowest * 1000:.1f} ms")
        assert slowest < 1.0, slowest


def _truth(db: Database, where: str, params: dict[str, Any]) -> list[int]:
    rows = db.execute(
        f"SELECT id FROM pgherald.events e WHERE {where} ORDER BY id DESC",
        tuple(params.values()) or None,
    )
    return [int(r[0]) for r in rows]  # type: ignore[call-overload]


def _walk(log: ChangeLog, filters: browse.Filters, window: int, limit: int) -> list[int]:
    seen: list[int] = []
    before = browse.NEWEST
    for _ in range(10_000):
        found = browse.page(log, filters, before, limit=limit, window=window)
        assert len(found.events) <= limit
        seen += [e.id for e in found.events]
        if found.older is None:
            return seen
        assert found.older < before
        before = found.older
    raise AssertionError("paging did not end")


def test_paging_visits_exactly_the_matches_in_order(db: Database) -> None:
    rng = random.Random(7)
    settings = store(db, ["a", "b", "c"])
    ops = ["insert", "update", "delete"]
    events = [
        event(
            i,
            rng.choice(["a", "a", "b", "c"]),
            row=rng.randint(1, 6),
            op=rng.choice(ops),  # type: ignore[arg-type]
            name=rng.choice(["Ada", "Grace", "ADA lovelace", "Alan"]),
            when=START + timedelta(minutes=i),
        )
        for i in range(1, 400)
    ]
    append(db, settings, events)
    with db.connect() as conn:
        log = ChangeLog(conn, settings.schema)
        since, until = START + timedelta(minutes=50), START + timedelta(minutes=300)
        text = (
            "lower(array_to_string(new_values, ' ') || ' '"
            " || coalesce(array_to_string(old_values, ' '), '')) LIKE '%%ada%%'"
        )
        cases: list[tuple[browse.Filters, str, dict[str, Any]]] = [
            (browse.Filters(), "true", {}),
            (browse.Filters(op="delete"), "op = 'delete'", {}),
            (
                browse.Filters(watches=("b", "c"), op="update"),
                "watch IN ('b','c') AND op = 'update'",
                {},
            ),
            (browse.Filters(watches=("a",), text="ada"), "watch = 'a' AND " + text, {}),
            (
                browse.Filters(since=since, until=until),
                "commit_time >= %s AND commit_time < %s",
                {"s": since, "u": until},
            ),
            (
                browse.Filters(watches=("a",), row_key='["3"]', op="insert"),
                "watch = 'a' AND row_key = '[\"3\"]' AND op = 'insert'",
                {},
            ),
            (browse.Filters(watches=()), "false", {}),
        ]
        for filters, where, params in cases:
            truth = _truth(db, where, params)
            for window, limit in [(7, 5), (50, 3), (1000, 50), (3, 1)]:
                assert _walk(log, filters, window, limit) == truth, (filters, window, limit)


def test_live_reads_only_what_is_new_and_matches(db: Database) -> None:
    settings = store(db, ["a", "b"])
    append(db, settings, [event(i, "a" if i % 2 else "b", op="insert") for i in range(1, 11)])
    with db.connect() as conn:
        log = ChangeLog(conn, settings.schema)
        got = browse.newer(log, browse.Filters(watches=("a",)), after=4, upto=9)
        assert [s.id for s in got] == [5, 7, 9]
        got = browse.newer(log, browse.Filters(), after=8, upto=100)
        assert [s.id for s in got] == [9, 10]
        assert browse.newer(log, browse.Filters(watches=()), after=0, upto=100) == []
