"""The router reads events without their rows when no subscription tests row values; the
deliveries it makes that way must be exactly those of the whole-event path."""

from __future__ import annotations

import dataclasses

from pgherald import routing_admin
from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.delivery.router import Router
from pgherald.events import ChangeEvent, Operation
from pgherald.store.changelog import ChangeLog
from tests import capture_harness as h
from tests.conftest import Database
from tests.integration.sink_events import change


def events() -> list[ChangeEvent]:
    """Inserts, updates (of the name only, of the amount, of both), deletes, a key move,
    keys that need escaping in JSON, and a truncate (no key)."""
    out: list[ChangeEvent] = []
    ops: tuple[Operation, ...] = ("insert", "update", "update", "update", "delete")
    for seq in range(1, 41):
        op = ops[seq % len(ops)]
        event = change(seq, row=seq % 9, op=op, name='Zoë "q" \\ ')
        if op == "update":
            changed = (("name",), ("amount",), ("name", "amount"))[seq % 3]
            event = dataclasses.replace(event, changed=changed)
        if seq % 13 == 0:
            event = dataclasses.replace(event, key={"id": f'k"{seq}\\\u00e9'})
        out.append(event)
    out.append(change(41, op="truncate"))
    out.append(change(42, row=3, op="update", old_row=4))  # a key move
    return out


def deliveries(settings: Settings) -> list[tuple[int, str, str]]:
    with connect(settings) as conn:
        rows = conn.execute(
            "SELECT event_id, sink, order_key FROM pgherald.deliveries ORDER BY event_id, sink"
        ).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def route(settings: Settings) -> None:
    router = Router(settings, batch_size=7)  # several batches
    with connect(settings) as conn:
        while router.route_once(conn):
            pass


def test_routing_without_rows_makes_the_same_deliveries(db: Database) -> None:
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, name text, amount numeric)")
    settings = h.install(db.dsn, ["orders"], settings=h.settings_for(db.dsn, method="trigger"),
                         slot=False)  # fmt: skip
    for name in ("all", "some_ops", "ignoring", "by_column", "strict"):
        routing_admin.add_sink(settings, name, "stdout", strictly_ordered=name == "strict")
    routing_admin.subscribe(settings, "all", ["orders"])
    routing_admin.subscribe(settings, "some_ops", ["orders"], ops=["insert", "delete"])
    routing_admin.subscribe(settings, "ignoring", ["orders"], ignore_columns=["name"])
    routing_admin.subscribe(settings, "by_column", ["orders"], columns=["amount"])
    routing_admin.subscribe(settings, "strict", ["orders"])
    with connect(settings) as conn:
        ChangeLog(conn, settings.schema).append(events())
        conn.commit()

    route(settings)  # no subscription tests values: events read without their rows
    light = deliveries(settings)

    with connect(settings) as conn:
        conn.execute("DELETE FROM pgherald.deliveries")
        conn.execute("DELETE FROM pgherald.checkpoints WHERE source = 'router'")
        conn.commit()
    routing_admin.add_sink(settings, "valued", "stdout")
    routing_admin.subscribe(settings, "valued", ["orders"], where="amount > 0")
    route(settings)  # now one does: whole events (the new subscription gets none of them)
    whole = deliveries(settings)

    assert light == whole
    by_sink = {s: sum(1 for _, sink, _ in light if sink == s) for s in ("all", "some_ops")}
    assert by_sink == {"all": 42, "some_ops": 16}
    assert {k for _, sink, k in light if sink == "strict"} == {""}
    assert len({k for _, sink, k in light if sink == "all"}) > 9  # one key per row, escaped
