"""The delivery commands: ``sink add/list/disable/enable/remove``, ``subscribe``, ``unsubscribe``,
``subscriptions``, ``deliveries list/retry/discard`` and ``tail``.

They live apart from ``cli.py`` to keep each file about one thing; ``cli.py`` registers
them and adds the connection options to each (``LEAVES``). The settings come from ``cli``
at call time: it imports this module, so this one cannot import it at import time.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from pgherald import present


def _cli() -> Any:
    from pgherald import cli

    return cli


def _settings(ctx: click.Context) -> Any:
    return _cli().settings_of(ctx)


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


@click.group()
def sink() -> None:
    """Add, list, disable, enable and remove sinks (where changes are delivered)."""


@sink.command("add")
@click.argument("name")
@click.argument(
    "kind",
    type=click.Choice(
        ["webhook", "amqp", "nats", "redis", "mqtt", "replica", "stdout", "feed", "email"]
    ),
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pgherald", "debezium", "cloudevents", "simple"]),
    default="pgherald",
    show_default=True,
    help="How each event is written.",
)
@click.option("--option", "-o", "pairs", multiple=True, help="key=value option of the sink kind.")
@click.option("--strictly-ordered", is_flag=True, help="Deliver everything in log order.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=10, show_default=True)
@click.pass_context
def sink_add(
    ctx: click.Context,
    name: str,
    kind: str,
    fmt: str,
    pairs: tuple[str, ...],
    strictly_ordered: bool,
    max_attempts: int,
) -> None:
    """Add sink NAME of KIND (its options are checked now; nothing connects yet)."""
    from pgherald import routing_admin

    added = routing_admin.add_sink(
        _settings(ctx),
        name,
        kind,
        format=fmt,
        options=routing_admin.parse_options(pairs),
        strictly_ordered=strictly_ordered,
        max_attempts=max_attempts,
    )
    click.echo(f"added sink {added.name!r} ({added.kind}, format {added.format})")


@sink.command("list")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def sink_list(ctx: click.Context, fmt: str) -> None:
    """List the sinks and their subscriptions."""
    from pgherald import routing_admin

    settings = _settings(ctx)
    sinks = routing_admin.list_sinks(settings)
    subs = routing_admin.list_subscriptions(settings)
    if fmt == "json":
        out = [
            {
                "name": s.name,
                "kind": s.kind,
                "format": s.format,
                "strictly_ordered": s.strictly_ordered,
                "max_attempts": s.max_attempts,
                "enabled": s.enabled,
                "subscriptions": [
                    {"watch": x.watch, "filter": x.filter, "ignore_columns": list(x.ignore_columns)}
                    for x in subs
                    if x.sink == s.name
                ],
            }
            for s in sinks
        ]
        click.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    if not sinks:
        click.echo("no sinks: add one with `pgherald sink add NAME KIND`")
    for s in sinks:
        watched = [x.watch for x in subs if x.sink == s.name]
        click.echo(
            f"{present.clean(s.name, 40)}  {s.kind}  {s.format}"
            + ("  strictly ordered" if s.strictly_ordered else "")
            + ("" if s.enabled else "  DISABLED")
            + f"  watches: {', '.join(present.clean(w, 40) for w in watched) or 'none'}"
        )


@sink.command("disable")
@click.argument("name")
@click.pass_context
def sink_disable(ctx: click.Context, name: str) -> None:
    """Stop delivering to sink NAME (running delivery stops at once; its open deliveries
    wait for `sink enable`, and changes made meanwhile are not routed to it)."""
    from pgherald import routing_admin

    changed = routing_admin.set_sink_enabled(_settings(ctx), name, False)
    click.echo(f"disabled sink {name!r}" if changed else f"sink {name!r} was disabled already")


@sink.command("enable")
@click.argument("name")
@click.pass_context
def sink_enable(ctx: click.Context, name: str) -> None:
    """Deliver to sink NAME again (running delivery starts at once)."""
    from pgherald import routing_admin

    changed = routing_admin.set_sink_enabled(_settings(ctx), name, True)
    click.echo(f"enabled sink {name!r}" if changed else f"sink {name!r} was enabled already")


@sink.command("remove")
@click.argument("name")
@click.pass_context
def sink_remove(ctx: click.Context, name: str) -> None:
    """Remove a sink, its subscriptions and its deliveries."""
    from pgherald import routing_admin

    routing_admin.remove_sink(_settings(ctx), name)
    click.echo(f"removed sink {name!r}")


@click.command()
@click.argument("sink_name")
@click.argument("watches", nargs=-1, required=True)
@click.option("--ops", help="Only these operations (comma-separated: insert,update,...).")
@click.option("--columns", help="Only updates that changed one of these columns.")
@click.option("--where", help="Only rows satisfying this condition, e.g. \"status = 'x'\".")
@click.option("--ignore-columns", help="Updates of only these columns are not delivered.")
@click.pass_context
def subscribe(
    ctx: click.Context,
    sink_name: str,
    watches: tuple[str, ...],
    ops: str | None,
    columns: str | None,
    where: str | None,
    ignore_columns: str | None,
) -> None:
    """Deliver the changes of WATCHES to SINK_NAME from now on."""
    from pgherald import routing_admin

    routing_admin.subscribe(
        _settings(ctx),
        sink_name,
        watches,
        ops=_names(ops),
        columns=_names(columns),
        where=where,
        ignore_columns=_names(ignore_columns) or (),
    )
    click.echo(f"subscribed sink {sink_name!r} to {', '.join(repr(w) for w in watches)}")


@click.command()
@click.argument("sink_name")
@click.argument("watches", nargs=-1, required=True)
@click.pass_context
def unsubscribe(ctx: click.Context, sink_name: str, watches: tuple[str, ...]) -> None:
    """Stop delivering the changes of WATCHES to SINK_NAME."""
    from pgherald import routing_admin

    routing_admin.unsubscribe(_settings(ctx), sink_name, watches)
    click.echo(f"unsubscribed sink {sink_name!r} from {', '.join(repr(w) for w in watches)}")


@click.group("deliveries")
def deliveries_group() -> None:
    """List, retry and discard deliveries."""


@deliveries_group.command("list")
@click.option("--sink", "sink_name")
@click.option(
    "--status", type=click.Choice(["pending", "delivering", "delivered", "failed", "dead"])
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def deliveries_list(
    ctx: click.Context, sink_name: str | None, status: str | None, limit: int, fmt: str
) -> None:
    """The latest deliveries, newest first, with their status and last error."""
    from pgherald import routing_admin

    rows = routing_admin.list_deliveries(_settings(ctx), sink_name, status, limit)
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "log_id": r.log_id,
                        "event_id": r.event_id,
                        "watch": r.watch,
                        "op": r.op,
                        "sink": r.sink,
                        "status": r.status,
                        "attempts": r.attempts,
                        "next_attempt_at": r.next_attempt_at.isoformat(),
                        "last_error": r.last_error,
                    }
                    for r in rows
                ],
                ensure_ascii=False,
                indent=2,
            )
        )
        return
    for r in rows:
        error = f"  {present.clean(r.last_error, 120)}" if r.last_error else ""
        click.echo(
            f"{r.id}  {present.clean(r.sink, 30)}  {r.status}  attempts {r.attempts}"
            f"  {present.clean(r.watch, 30)} {r.op} {r.event_id}{error}"
        )


@deliveries_group.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--sink", "sink_name", help="Retry every dead or failed delivery of this sink.")
@click.pass_context
def deliveries_retry(ctx: click.Context, ids: tuple[int, ...], sink_name: str | None) -> None:
    """Put dead or failed deliveries back in line, now, with their attempts reset."""
    from pgherald import routing_admin

    done = routing_admin.retry_deliveries(_settings(ctx), list(ids) or None, sink_name)
    click.echo(f"{len(done)} deliveries will be tried again")


@deliveries_group.command("discard")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.pass_context
def deliveries_discard(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Give up open deliveries (they become dead)."""
    from pgherald import routing_admin

    done = routing_admin.discard_deliveries(_settings(ctx), list(ids))
    click.echo(f"{len(done)} deliveries discarded")


@click.command()
@click.argument("watches", nargs=-1)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pgherald", "debezium", "cloudevents", "simple"]),
    default="pgherald",
    show_default=True,
)
@click.option("--since", type=click.IntRange(min=0), help="Start after this log id (default: now).")
@click.pass_context
def tail(ctx: click.Context, watches: tuple[str, ...], fmt: str, since: int | None) -> None:
    """Follow the change log live, one JSON line per change, like `tail -f` (Ctrl-C stops)."""
    import psycopg

    from pgherald.db.connect import connect
    from pgherald.db.types import TypeRegistry
    from pgherald.events.formats import FormatError, encode
    from pgherald.store.changelog import ChangeLog, changes_channel

    settings = _settings(ctx)
    wanted = set(watches)
    try:
        with (
            connect(settings, autocommit=True, application_name="pgherald-tail") as conn,
            connect(settings, autocommit=True, application_name="pgherald-tail") as wake,
        ):
            wake.execute(
                psycopg.sql.SQL("LISTEN {}").format(
                    psycopg.sql.Identifier(changes_channel(settings.schema))
                )
            )
            changelog = ChangeLog(conn, settings.schema)
            loader = TypeRegistry.load(conn)
            after = since if since is not None else changelog.last_id()
            while True:
                batch = changelog.read(after_id=after, limit=1000, loader=loader)
                for stored in batch:
                    after = stored.id
                    if wanted and stored.event.watch not in wanted:
                        continue
                    try:
                        line = encode(stored.event, fmt)  # type: ignore[arg-type]
                    except FormatError:
                        continue  # this format has no form for it (schema events...)
                    click.echo(line.decode("utf-8"))
                if not batch:
                    for _ in wake.notifies(timeout=1.0, stop_after=1):
                        pass
    except KeyboardInterrupt:
        return
    except BrokenPipeError:
        time.sleep(0)
        return


COMMANDS = (sink, subscribe, unsubscribe, deliveries_group, tail)
"""What ``cli`` registers on ``main``."""

LEAVES = (
    sink_add,
    sink_list,
    sink_disable,
    sink_enable,
    sink_remove,
    subscribe,
    unsubscribe,
    deliveries_list,
    deliveries_retry,
    deliveries_discard,
    tail,
)
"""The commands that take the connection options (``cli`` adds them)."""
