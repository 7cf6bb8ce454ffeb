"""What a configuration reload changes in the store: the difference between the file the
daemon was running with and the file as it is now.

A ``[[watch]]``, ``[[sink]]`` or ``[[subscription]]`` added to the file is created; a sink
or subscription whose definition changed is updated; one removed from the file is removed
(watches and subscriptions) or disabled (sinks: their deliveries stay, and adding the sink
back enables it again). Watches, sinks and subscriptions made with the command line are
never touched, because they were in neither file. A watch whose definition changed is left
as it is, with a warning: changing a watch means capturing it anew.

Everything that can be checked without changing anything is checked first (the settings
that cannot change while running, every sink's options, every filter, that each
subscription names a sink and a watch that will exist), so a bad file changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

from pgherald import admin, app, routing_admin
from pgherald.config import Settings, SinkSpec, SubscriptionSpec, WatchSpec
from pgherald.db.connect import connect
from pgherald.errors import ConfigError
from pgherald.routing.subscriptions import Subscription
from pgherald.sinks.base import SinkConfig, check_format
from pgherald.store import deliveries, migrations
from pgherald.store import watches as registry
from pgherald.store.deliveries import StoredSink

log = logging.getLogger("pgherald")

FIXED: Final = ("dsn", "schema", "slot", "publication")
"""Settings a running pgherald cannot change: they say which database and objects it uses."""


@dataclass
class Changes:
    """What a reload did to the store, for the log."""

    watches_added: list[str] = field(default_factory=list)
    watches_removed: list[str] = field(default_factory=list)
    watches_unchanged: list[str] = field(default_factory=list)
    """Watches whose definition changed in the file, left as they are."""
    watches_retained: list[str] = field(default_factory=list)
    """Watches whose ``retain`` alone changed in the file: that is applied (it changes
    nothing in capture; the next prune uses it)."""
    sinks_added: list[str] = field(default_factory=list)
    sinks_updated: list[str] = field(default_factory=list)
    sinks_disabled: list[str] = field(default_factory=list)
    subscribed: list[str] = field(default_factory=list)
    unsubscribed: list[str] = field(default_factory=list)

    def describe(self) -> list[str]:
        """One phrase per kind of change, e.g. ``added watch 'orders'``."""
        out = []
        for label, names in (
            ("added watch", self.watches_added),
            ("removed watch", self.watches_removed),
            ("changed the retain of watch", self.watches_retained),
            ("added sink", self.sinks_added),
            ("updated sink", self.sinks_updated),
            ("disabled sink", self.sinks_disabled),
        ):
            if names:
                out.append(f"{label} {_names(names)}")
        for label, pairs in (("subscribed", self.subscribed), ("unsubscribed", self.unsubscribed)):
            if pairs:
                out.append(f"{label} {', '.join(pairs)}")
        return out


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def check_fixed(old: Settings, new: Settings) -> None:
    """Refuses a new configuration that changes a setting a running pgherald cannot."""
    changed = [k for k in FIXED if getattr(old, k) != getattr(new, k)]
    if changed:
        raise ConfigError(
            f"{', '.join(changed)} cannot change while pgherald runs; restart it to use the new"
            " value (e.g. systemctl restart pgherald)"
        )


def watch_name(spec: WatchSpec) -> str:
    if spec.name:
        return spec.name
    schema, table = admin.parse_table_name(spec.table)
    return admin.default_watch_name(schema, table)


def _pairs(specs: Sequence[SubscriptionSpec]) -> dict[tuple[str, str], SubscriptionSpec]:
    return {(s.sink, w): s for s in specs for w in s.watches}


def _filter(spec: SubscriptionSpec) -> tuple[Any, ...]:
    return (spec.ops, spec.columns, spec.where, spec.ignore_columns)


def _stored(spec: SinkSpec, options: dict[str, Any]) -> StoredSink:
    return StoredSink(
        spec.name,
        spec.kind,
        spec.format,
        options,
        spec.strictly_ordered,
        spec.max_attempts,
        True,
    )


def _options(spec: SinkSpec, existing: StoredSink | None) -> dict[str, Any]:
    """The options to store: a feed keeps the token it has unless the file sets one."""
    options = dict(spec.options)
    if spec.kind == "feed" and not options.get("token"):
        token = (existing.options.get("token") if existing is not None else None) or None
        if token:
            options["token"] = token
        else:
            from pgherald.sinks import feed

            options = feed.with_token(options)
    return options


def apply(old: Settings, new: Settings, changes: Changes | None = None) -> Changes:
    """Makes the store follow the file's changes from ``old`` to ``new`` (module docstring).

    ``changes`` collects what was done as it is done, so that a caller who gets an error
    half-way (the database refused a watch) can say what had been applied before it.
    """
    check_fixed(old, new)
    old_watches = {watch_name(w): w for w in old.watches}
    new_watches = {watch_name(w): w for w in new.watches}
    old_sinks = {s.name: s for s in old.sinks}
    new_sinks = {s.name: s for s in new.sinks}
    old_subs = _pairs(old.subscriptions)
    new_subs = _pairs(new.subscriptions)

    # -- checks, nothing changed yet
    for sink_spec in new.sinks:
        if old_sinks.get(sink_spec.name) != sink_spec:
            app.build_sink(
                SinkConfig(
                    name=sink_spec.name,
                    kind=sink_spec.kind,
                    format=check_format(sink_spec.format),
                    options=_options(sink_spec, None),
                    strictly_ordered=sink_spec.strictly_ordered,
                )
            )
    for (sink, watch), sub in new_subs.items():
        filter_: dict[str, Any] = {}
        if sub.ops is not None:
            filter_["ops"] = list(sub.ops)
        if sub.columns:
            filter_["columns"] = list(sub.columns)
        if sub.where:
            filter_["where"] = sub.where
        Subscription.from_filter(sink, watch, filter_, sub.ignore_columns)
    with connect(new, autocommit=True) as conn:
        migrations.require_current(conn, new.schema)
        stored_sinks = {s.name: s for s in deliveries.list_sinks(conn, new.schema)}
        stored_watches = {w.name for w in registry.list_watches(conn, new.schema)}
    removed_watches = [n for n in old_watches if n not in new_watches and n in stored_watches]
    for sink, watch in new_subs:
        if sink not in new_sinks and sink not in stored_sinks:
            raise ConfigError(f"a subscription names sink {sink!r}, which does not exist")
        if watch in removed_watches or (watch not in new_watches and watch not in stored_watches):
            raise ConfigError(f"a subscription names watch {watch!r}, which does not exist")

    # -- changes: watches first (the likeliest to be refused by the database), then sinks,
    # then subscriptions, then removals.
    changes = changes if changes is not None else Changes()
    for name, watch_spec in new_watches.items():
        if name not in stored_watches:
            admin.add_watch_from_spec(new, watch_spec)
            changes.watches_added.append(name)
        elif name in old_watches and old_watches[name] != watch_spec:
            if replace(old_watches[name], retain=watch_spec.retain) == watch_spec:
                with connect(new) as conn:
                    registry.set_watch_retain(conn, new.schema, name, watch_spec.retain)
                    conn.commit()
                changes.watches_retained.append(name)
            else:
                changes.watches_unchanged.append(name)
    for name, spec in new_sinks.items():
        existing = stored_sinks.get(name)
        if existing is None:
            routing_admin.add_sink(
                new,
                name,
                spec.kind,
                format=spec.format,
                options=spec.options,
                strictly_ordered=spec.strictly_ordered,
                max_attempts=spec.max_attempts,
            )
            changes.sinks_added.append(name)
            continue
        wanted = _stored(spec, _options(spec, existing))
        if _definition(existing) != _definition(wanted):
            with connect(new) as conn:
                deliveries.update_sink(conn, new.schema, wanted)
                conn.commit()
            changes.sinks_updated.append(name)
    for (sink, watch), sub in new_subs.items():
        if old_subs.get((sink, watch)) is None or _filter(old_subs[(sink, watch)]) != _filter(sub):
            routing_admin.subscribe(
                new,
                sink,
                [watch],
                ops=sub.ops,
                columns=sub.columns,
                where=sub.where,
                ignore_columns=sub.ignore_columns,
            )
            changes.subscribed.append(f"{sink!r} to {watch!r}")
    for sink, watch in old_subs:
        if (sink, watch) not in new_subs and watch not in removed_watches:
            try:
                routing_admin.unsubscribe(new, sink, [watch])
                changes.unsubscribed.append(f"{sink!r} from {watch!r}")
            except ConfigError:
                pass  # already gone (unsubscribed by hand, or its sink removed)
    for name in removed_watches:
        admin.remove_watch(new, name)
        changes.watches_removed.append(name)
    for name in old_sinks:
        existing = stored_sinks.get(name)
        if name not in new_sinks and existing is not None and existing.enabled:
            with connect(new) as conn:
                deliveries.update_sink(
                    conn, new.schema, StoredSink(**{**asdict(existing), "enabled": False})
                )
                conn.commit()
            changes.sinks_disabled.append(name)
    return changes


def _definition(sink: StoredSink) -> tuple[Any, ...]:
    return (
        sink.kind,
        sink.format,
        sink.options,
        sink.strictly_ordered,
        sink.max_attempts,
        sink.enabled,
    )
