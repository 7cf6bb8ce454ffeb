"""Managing sinks, subscriptions and deliveries (``pgherald sink``, ``subscribe``,
``deliveries``): checked first, then changed in one transaction, so a refused command
changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from pgherald import app
from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.errors import ConfigError
from pgherald.routing.subscriptions import Subscription
from pgherald.sinks.base import SinkConfig, check_format
from pgherald.store import deliveries, migrations
from pgherald.store import watches as registry
from pgherald.store.deliveries import DeliveryRow, StoredSink, StoredSubscription

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(name: str) -> str:
    if not name or _CONTROL.search(name) or len(name.encode("utf-8")) > 200:
        raise ConfigError(f"sink name {name!r} must be 1 to 200 bytes without control characters")
    return name


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs from the command line; ``headers.X=v`` builds a table."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r} is not key=value")
        if "." in key:
            table, _, sub = key.partition(".")
            out.setdefault(table, {})[sub] = value
        else:
            out[key] = value
    return out


def add_sink(
    settings: Settings,
    name: str,
    kind: str,
    *,
    format: str = "pgherald",
    options: Mapping[str, Any] | None = None,
    strictly_ordered: bool = False,
    max_attempts: int = 10,
) -> StoredSink:
    """Checks the sink's options (by building it, without connecting) and stores it."""
    _check_name(name)
    if max_attempts < 1:
        raise ConfigError("--max-attempts must be at least 1")
    if kind == "feed":
        from pgherald.sinks import feed

        options = feed.with_token(options or {})  # its secret address, made now
    config = SinkConfig(
        name=name,
        kind=kind,
        format=check_format(format),
        options=dict(options or {}),
        strictly_ordered=strictly_ordered,
    )
    app.build_sink(config)
    sink = StoredSink(name, kind, format, dict(options or {}), strictly_ordered, max_attempts, True)
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        if not deliveries.add_sink(conn, settings.schema, sink):
            raise ConfigError(f"a sink named {name!r} exists already; remove it first")
        conn.commit()
    return sink


def remove_sink(settings: Settings, name: str) -> None:
    """Removes a sink with its subscriptions and deliveries."""
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        if not deliveries.remove_sink(conn, settings.schema, name):
            raise ConfigError(f"no sink named {name!r} (see `pgherald sink list`)")
        conn.commit()


def set_sink_enabled(settings: Settings, name: str, enabled: bool) -> bool:
    """Disables (or enables again) a sink; False when it already was. Running delivery
    stops (or starts) delivering to it at once; a disabled sink keeps its open deliveries
    for when it is enabled again, and gets no deliveries for the changes made meanwhile."""
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        found = [s for s in deliveries.list_sinks(conn, settings.schema) if s.name == name]
        if not found:
            raise ConfigError(f"no sink named {name!r} (see `pgherald sink list`)")
        [sink] = found
        if sink.enabled == enabled:
            return False
        deliveries.update_sink(conn, settings.schema, replace(sink, enabled=enabled))
        conn.commit()
    return True


def list_sinks(settings: Settings) -> list[StoredSink]:
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        return deliveries.list_sinks(conn, settings.schema)


def subscribe(
    settings: Settings,
    sink: str,
    watches: Sequence[str],
    *,
    ops: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    where: str | None = None,
    ignore_columns: Sequence[str] = (),
) -> list[int]:
    """Subscribes ``sink`` to each watch with one filter; re-subscribing replaces the filter.

    The sink gets the events logged from now on.
    """
    if not watches:
        raise ConfigError("name at least one watch to subscribe to")
    filter: dict[str, Any] = {}
    if ops is not None:
        filter["ops"] = list(ops)
    if columns:
        filter["columns"] = list(columns)
    if where:
        filter["where"] = where
    for watch in watches:
        Subscription.from_filter(sink, watch, filter, ignore_columns)  # refuses a bad filter
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        names = {s.name for s in deliveries.list_sinks(conn, settings.schema)}
        if sink not in names:
            raise ConfigError(f"no sink named {sink!r} (add it with `pgherald sink add`)")
        for watch in watches:
            if registry.get_watch(conn, settings.schema, watch) is None:
                raise ConfigError(f"no watch named {watch!r} (see `pgherald watch list`)")
        ids = [
            deliveries.subscribe(conn, settings.schema, sink, w, filter, ignore_columns)
            for w in watches
        ]
        conn.commit()
    return ids


def unsubscribe(settings: Settings, sink: str, watches: Sequence[str]) -> None:
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        for watch in watches:
            if not deliveries.unsubscribe(conn, settings.schema, sink, watch):
                raise ConfigError(f"sink {sink!r} is not subscribed to watch {watch!r}")
        conn.commit()


def list_subscriptions(settings: Settings) -> list[StoredSubscription]:
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        return deliveries.list_subscriptions(conn, settings.schema)


def list_deliveries(
    settings: Settings, sink: str | None = None, status: str | None = None, limit: int = 100
) -> list[DeliveryRow]:
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        return deliveries.list_deliveries(conn, settings.schema, sink, status, limit)


def retry_deliveries(
    settings: Settings, ids: Sequence[int] | None = None, sink: str | None = None
) -> list[int]:
    if not ids and sink is None:
        raise ConfigError("name deliveries by id, or a sink with --sink (all its dead ones)")
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        done = deliveries.retry(conn, settings.schema, ids, sink)
        conn.commit()
    return done


def discard_deliveries(settings: Settings, ids: Sequence[int]) -> list[int]:
    if not ids:
        raise ConfigError("name the deliveries to discard by id")
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        done = deliveries.discard(conn, settings.schema, ids)
        conn.commit()
    return done


def sync_declared(settings: Settings) -> list[str]:
    """Adds the configuration file's ``[[sink]]`` entries that do not exist yet, and makes
    its ``[[subscription]]`` entries so (a filter that changed is replaced)."""
    added: list[str] = []
    existing = {s.name for s in list_sinks(settings)} if settings.sinks else set()
    for spec in settings.sinks:
        if spec.name not in existing:
            add_sink(
                settings,
                spec.name,
                spec.kind,
                format=spec.format,
                options=spec.options,
                strictly_ordered=spec.strictly_ordered,
                max_attempts=spec.max_attempts,
            )
            added.append(spec.name)
    for sub in settings.subscriptions:
        subscribe(
            settings,
            sub.sink,
            sub.watches,
            ops=sub.ops,
            columns=sub.columns,
            where=sub.where,
            ignore_columns=sub.ignore_columns,
        )
    return added
