"""The administrative operations: install, migrate, uninstall, and manage the watch registry.

These are plain functions that take ``Settings``, so the CLI, the Python API and the demo
share one implementation and the same checks. Each operation that changes something runs
in one transaction where PostgreSQL allows it, so a refused or failed operation changes
nothing: the watch, the publication's table list and a table's replica identity change
together or not at all.

Table and column names on the command line use SQL's own syntax, read with the same rules
PostgreSQL uses: ``schema.table`` or ``table`` (meaning ``public.table``); unquoted names are
folded to lower case; double quotes keep a name exactly (``"My Schema"."Odd ""Quoted"" Name"``).
Names are never spliced into SQL: they are looked up as parameters and composed with
``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql

from pgherald.config import TABLE_METHODS, Settings, TableMethod, WatchSpec
from pgherald.db.connect import connect
from pgherald.errors import CaptureError, ConfigError, SchemaError, WatchError
from pgherald.methods import choose_method
from pgherald.retain import check_retain
from pgherald.schedule import Schedule
from pgherald.sources import logical_admin, trigger_admin
from pgherald.sources.listen import check_channel
from pgherald.sources.logical import checkpoint_name
from pgherald.sources.snapshot import baseline_checkpoint, baseline_table
from pgherald.store import checkpoints, migrations
from pgherald.store import watches as registry
from pgherald.store.changelog import ChangeLog, StoredEvent
from pgherald.store.watches import Watch

NAME_LIMIT: Final = 63
"""PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes)."""

AVAILABLE_METHODS: Final[tuple[str, ...]] = ("auto", "logical", "trigger", "snapshot")
"""Capture methods this version can run; the others are accepted by the parser but refused."""

_UNQUOTED: Final = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_PLAIN: Final = re.compile(r"[a-z_][a-z0-9_$]*")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


# -- names ---------------------------------------------------------------------------------


def show_name(*parts: str) -> str:
    """A qualified name as SQL would write it, quoted only where needed, on one line.

    Used in messages, so control characters in hostile names are shown escaped rather than
    breaking the line.
    """
    shown = []
    for part in parts:
        text = part if _PLAIN.fullmatch(part) else '"' + part.replace('"', '""') + '"'
        shown.append(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))
    return ".".join(shown)


def split_names(text: str, separator: str, what: str) -> list[str]:
    """Reads ``separator``-separated SQL identifiers, as PostgreSQL would read them.

    Unquoted identifiers fold to lower case (ASCII only, as PostgreSQL does for UTF-8);
    quoted ones keep case, spaces, separators and quotes (doubled). Anything else is an
    error that says how to quote.
    """
    names: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == '"':
            j = i + 1
            chars: list[str] = []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise WatchError(
                        f"cannot read {what} {text!r}: a double quote is not closed"
                        ' (write a " inside a quoted name as "")'
                    )
                chars.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':
                    chars.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            name = "".join(chars)
            if not name:
                raise WatchError(f'cannot read {what} {text!r}: "" is an empty name')
        else:
            match = _UNQUOTED.match(text, i)
            if match is None:
                raise WatchError(
                    f"cannot read {what} {text!r}: put names with spaces, capitals or other"
                    " special characters in double quotes, e.g. '\"My Table\"'"
                )
            name = match.group().translate(_ASCII_LOWER)
            i = match.end()
        if "\x00" in name:
            raise WatchError(f"cannot read {what} {text!r}: names cannot contain NUL")
        if len(name.encode()) > NAME_LIMIT:
            raise WatchError(
                f"{what} {show_name(name)} is longer than PostgreSQL's {NAME_LIMIT}-byte limit"
                " for names, so no table or column can have it"
            )
        names.append(name)
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return names
        if text[i] != separator:
            raise WatchError(
                f"cannot read {what} {text!r} at {text[i:]!r}: put names with spaces or special"
                " characters in double quotes, e.g. '\"My Table\"'"
            )
        i += 1


_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def parse_table_name(text: str) -> tuple[str, str]:
    """``schema.table`` or ``table`` (in ``public``) -> ``(schema, table)``."""
    parts = split_names(text, ".", "table name")
    if len(parts) == 1:
        return "public", parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise WatchError(
        f"cannot read table name {text!r}: write schema.table, and quote names that contain"
        ' dots, e.g. \'"my.schema"."my.table"\''
    )


def parse_column_list(text: str) -> tuple[str, ...]:
    """``a, b, "Odd, Name"`` -> the column names, for ``--columns``, ``--key`` and friends."""
    names = split_names(text, ",", "column list")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise WatchError(f"column {show_name(duplicates[0])} is listed twice in {text!r}")
    return tuple(names)


def _retain(text: str | None) -> str | None:
    """A watch's retention as stored, checked before anything is changed."""
    return None if text is None else check_retain(text, "--retain")


def _check_watch_name(name: str) -> str:
    if not name or not name.strip():
        raise WatchError("a watch name must not be empty")
    if _CONTROL.search(name):
        raise WatchError(
            f"watch name {name!r} contains control characters: choose another with --name"
        )
    if len(name) > 200:
        raise WatchError("a watch name must be at most 200 characters")
    return name


def default_watch_name(schema: str, table: str) -> str:
    """``employees`` for ``public.employees``, ``hr.employees`` for other schemas."""
    return table if schema == "public" else f"{schema}.{table}"


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitResult:
    schema: str
    version: int
    installed: bool
    """False when the schema was already there (init is harmless to repeat)."""
    watches_added: tuple[str, ...] = ()


@dataclass(frozen=True)
class MigrateResult:
    schema: str
    from_version: int
    to_version: int


@dataclass(frozen=True)
class UninstallResult:
    removed: tuple[str, ...]
    kept: tuple[str, ...] = ()


@dataclass(frozen=True)
class AddedWatch:
    watch: Watch
    replica_identity: str
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class TableInfo:
    """What the catalog says about a table that someone wants to watch."""

    oid: int
    schema: str
    table: str
    kind: str
    replica_identity: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    identity_index: tuple[str, ...]
    unique_keys: tuple[tuple[str, ...], ...]
    owned: bool

    @property
    def shown(self) -> str:
        return show_name(self.schema, self.table)


# -- catalog lookups -----------------------------------------------------------------------

_TABLE_QUERY: Final = """
SELECT c.oid, c.relkind::text, c.relreplident::text, pg_has_role(c.relowner, 'USAGE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

_COLUMNS_QUERY: Final = """
SELECT attname FROM pg_attribute
WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum
"""

_INDEXES_QUERY: Final = """
SELECT i.indisprimary, i.indisreplident,
       array_agg(a.attname ORDER BY k.ord) AS columns
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
  AND k.ord <= i.indnkeyatts
GROUP BY i.indexrelid, i.indisprimary, i.indisreplident
"""

_SIMILAR_QUERY: Final = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE lower(n.nspname) = lower(%s) AND lower(c.relname) = lower(%s)
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
LIMIT 1
"""

_KINDS: Final = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
    "S": "sequence",
    "i": "index",
    "I": "partitioned index",
    "c": "composite type",
    "t": "TOAST table",
}


def table_info(conn: psycopg.Connection[Any], schema: str, table: str) -> TableInfo:
    """The table's kind, columns, keys and replica identity; a clear error when it is absent."""
    row = conn.execute(_TABLE_QUERY, (schema, table)).fetchone()
    if row is None:
        hint = ""
        similar = conn.execute(_SIMILAR_QUERY, (schema, table)).fetchone()
        if similar is not None:
            hint = f" (did you mean {show_name(str(similar[0]), str(similar[1]))}? quote names"
            hint += " that have capitals)"
        raise WatchError(f"no table {show_name(schema, table)}{hint}")
    oid, kind, ident, owned = row
    columns = tuple(str(r[0]) for r in conn.execute(_COLUMNS_QUERY, (oid,)).fetchall())
    primary: tuple[str, ...] = ()
    identity: tuple[str, ...] = ()
    uniques: list[tuple[str, ...]] = []
    for is_primary, is_identity, cols in conn.execute(_INDEXES_QUERY, (oid,)).fetchall():
        names = tuple(str(c) for c in cols)
        uniques.append(names)
        if is_primary:
            primary = names
        if is_identity:
            identity = names
    return TableInfo(
        oid=int(oid),
        schema=schema,
        table=table,
        kind=str(kind),
        replica_identity=logical_admin.REPLICA_IDENTITIES[str(ident)],
        columns=columns,
        primary_key=primary,
        identity_index=identity,
        unique_keys=tuple(uniques),
        owned=bool(owned),
    )


def _check_columns(info: TableInfo, names: Sequence[str], option: str) -> None:
    for name in names:
        if name not in info.columns:
            listed = ", ".join(show_name(c) for c in info.columns[:30])
            more = ", ..." if len(info.columns) > 30 else ""
            raise WatchError(
                f"no column {show_name(name)} in table {info.shown} (given in {option});"
                f" its columns are: {listed}{more}"
            )


# -- install, migrate, uninstall -------------------------------------------------------------


def _version(conn: psycopg.Connection[Any], schema: str) -> int:
    return int(migrations.current_version(conn, schema) or 0)


def init(settings: Settings) -> InitResult:
    """Installs pgherald's schema, then adds the watches the configuration file declares.

    Running it again is harmless: an installed schema is left as it is (``migrate``
    upgrades it), and declared watches that exist already are left alone.
    """
    with connect(settings) as conn:
        version = _version(conn, settings.schema)
        installed = version == 0
        if installed:
            with conn.transaction():
                migrations.install(conn, settings.schema)
            version = _version(conn, settings.schema)
        conn.commit()
    added = sync_declared_watches(settings) if settings.watches else ()
    if settings.sinks or settings.subscriptions:
        from pgherald import routing_admin

        routing_admin.sync_declared(settings)
    return InitResult(settings.schema, version, installed, added)


def migrate(settings: Settings) -> MigrateResult:
    """Applies the migrations that the installed schema lacks."""
    with connect(settings) as conn:
        before = _version(conn, settings.schema)
        if before == 0:
            raise SchemaError(
                f"pgherald's schema {show_name(settings.schema)} is not installed in this database;"
                " run `pgherald init` first"
            )
        with conn.transaction():
            migrations.migrate(conn, settings.schema)
        after = _version(conn, settings.schema)
        conn.commit()
    return MigrateResult(settings.schema, before, after)


_TRIGGERS_QUERY: Final = """
SELECT t.tgname, n.nspname, c.relname
FROM pg_trigger t
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE pn.nspname = %s AND NOT t.tgisinternal
ORDER BY n.nspname, c.relname, t.tgname
"""


def uninstall(settings: Settings) -> UninstallResult:
    """Removes everything pgherald created here: triggers, publication, slot and schema.

    A replication slot in use (``pgherald run`` still going) stops the uninstall before it
    changes anything. The slot is dropped first, outside the transaction (PostgreSQL cannot
    drop one inside), then the rest goes in one transaction.
    """
    removed: list[str] = []
    kept: list[str] = []
    with connect(settings, autocommit=True) as conn:
        slot = logical_admin.slot_info(conn, settings.slot)
        dbname = conn.info.dbname
        if slot is not None and slot.database != dbname:
            kept.append(
                f"replication slot {settings.slot!r} (it belongs to database {slot.database!r})"
            )
            slot = None
        if slot is not None and slot.active:
            raise CaptureError(
                f"replication slot {settings.slot!r} is in use by process {slot.active_pid}"
                " (is `pgherald run` still running?); stop it, then uninstall again"
            )
        if slot is not None:
            logical_admin.drop_slot(conn, settings.slot)
            removed.append(f"replication slot {settings.slot}")
        with conn.transaction():
            for trigger, schema, table in conn.execute(
                _TRIGGERS_QUERY, (settings.schema,)
            ).fetchall():
                conn.execute(
                    sql.SQL("DROP TRIGGER {} ON {}").format(
                        sql.Identifier(trigger), sql.Identifier(schema, table)
                    )
                )
                removed.append(f"trigger {show_name(trigger)} on {show_name(schema, table)}")
            if logical_admin.publication_exists(conn, settings.publication):
                logical_admin.drop_publication(conn, settings.publication)
                removed.append(f"publication {settings.publication}")
            if _schema_exists(conn, settings.schema):
                migrations.drop_schema(conn, settings.schema)
                removed.append(f"schema {show_name(settings.schema)}")
    return UninstallResult(tuple(removed), tuple(kept))


def _schema_exists(conn: psycopg.Connection[Any], schema: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    return row is not None


# -- the watch registry ------------------------------------------------------------------------


def _lock_registry(conn: psycopg.Connection[Any], schema: str) -> None:
    """Serialises registry changes, so two `watch add` at once agree on the publication."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgherald.watches:' || %s))", (schema,))


def _sync_publication(conn: psycopg.Connection[Any], settings: Settings) -> None:
    tables = sorted(
        {
            (w.schema_name, w.table_name)
            for w in registry.list_watches(conn, settings.schema)
            if w.method == "logical" and w.schema_name and w.table_name
        }
    )
    try:
        logical_admin.ensure_publication(conn, settings.publication, tables)
    except psycopg.errors.InsufficientPrivilege as e:
        raise WatchError(
            f"cannot update publication {settings.publication!r}: {e.diag.message_primary}"
            " (logical capture needs the tables' owner, or a superuser, to run pgherald)"
        ) from None


def add_watch(
    settings: Settings,
    table: str | tuple[str, str],
    *,
    columns: Sequence[str] | None = None,
    ignore_columns: Sequence[str] = (),
    key: Sequence[str] | None = None,
    name: str | None = None,
    method: str | None = None,
    replica_identity_full: bool = False,
    snapshot: bool = False,
    schedule: Schedule | None = None,
    retain: str | None = None,
) -> AddedWatch:
    """Checks and stores a watch on a table, and adds the table to the publication.

    ``table`` is ``"schema.table"`` (SQL syntax, see the module docstring) or an exact
    ``(schema, table)`` pair; column names are exact. Refused, with nothing changed: an
    unknown table or column, a table without a primary key when no ``key`` is given, and
    (for logical capture) a table whose UPDATEs and DELETEs PostgreSQL would reject once
    published, unless ``replica_identity_full`` makes them publishable. ``snapshot`` asks
    capture to start the watch with the table's current rows (as ``read`` events).
    """
    if (method or settings.method) == "snapshot":
        if replica_identity_full or snapshot:
            raise WatchError(
                "--replica-identity-full and --snapshot are for logical capture; a snapshot"
                " watch records its baseline on its first run"
            )
        return add_snapshot_watch(
            settings,
            name,
            table=table,
            key=key,
            columns=columns,
            ignore_columns=ignore_columns,
            schedule=schedule,
            retain=retain,
        )
    if schedule is not None:
        raise WatchError("--schedule and --every are for snapshot watches (--method snapshot)")
    schema_name, table_name = parse_table_name(table) if isinstance(table, str) else table
    with connect(settings) as conn:
        with conn.transaction():
            migrations.require_current(conn, settings.schema)
            _lock_registry(conn, settings.schema)
            added = _add_watch(
                conn,
                settings,
                schema_name,
                table_name,
                columns=tuple(columns) if columns is not None else None,
                ignore_columns=tuple(ignore_columns),
                key=tuple(key) if key is not None else None,
                name=name,
                method=method or settings.method,
                replica_identity_full=replica_identity_full,
                snapshot=snapshot,
                retain=retain,
            )
        conn.commit()
    if added.watch.method == "logical":
        # After the commit: PostgreSQL refuses to create a slot in a transaction that wrote.
        try:
            if ensure_slot(settings):
                added = replace(
                    added,
                    notes=(
                        *added.notes,
                        f"created replication slot {settings.slot!r}: changes are kept from now on",
                    ),
                )
        except CaptureError as e:
            added = replace(added, notes=(*added.notes, f"slot not created yet: {e}"))
    return added


def add_snapshot_watch(
    settings: Settings,
    name: str | None,
    *,
    table: str | tuple[str, str] | None = None,
    view: str | tuple[str, str] | None = None,
    query: str | None = None,
    key: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    ignore_columns: Sequence[str] = (),
    schedule: Schedule | None = None,
    initial_events: bool = False,
    first_run: bool = True,
    retain: str | None = None,
) -> AddedWatch:
    """Stores a snapshot watch of a table, a view or a query, then records its baseline.

    The query is checked by PostgreSQL (``LIMIT 0``, in a transaction rolled back), so a
    query that does not parse, or lacks the key or ignored columns, changes nothing. The
    first run then records the baseline (``first_run=False`` leaves it to the schedule).
    """
    given = [o for o, v in (("--table", table), ("--view", view), ("--query", query)) if v]
    if len(given) != 1:
        raise WatchError("a snapshot watch watches one of a table, a view (--view) or --query")
    if query is not None and not query.strip():
        raise WatchError("--query is empty")
    if columns is not None and query is not None:
        raise WatchError("--columns is for tables and views; select the columns in --query")
    if key is not None and not key:
        raise WatchError("--key is empty: name the columns that identify a row")
    retain = _retain(retain)
    notes: list[str] = []
    schema_name = table_name = None
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        if query is None:
            target = table if table is not None else view
            assert target is not None
            schema_name, table_name = (
                parse_table_name(target) if isinstance(target, str) else target
            )
            info = table_info(conn, schema_name, table_name)
            if info.kind not in ("r", "p", "v", "m", "f"):
                raise WatchError(
                    f"{info.shown} is a {_KINDS.get(info.kind, 'relation')}; snapshot watches"
                    " compare tables, views and queries"
                )
            if columns is not None:
                _check_columns(info, columns, "--columns")
            _check_columns(info, ignore_columns, "--ignore-columns")
            if key is not None:
                _check_columns(info, key, "--key")
            key = tuple(key) if key is not None else (info.primary_key or info.identity_index)
            result = [c for c in info.columns if columns is None or c in columns or c in key]
        else:
            try:
                cur = conn.execute(
                    sql.SQL("SELECT * FROM ({}) AS q LIMIT 0").format(sql.SQL(query))
                )
            except psycopg.Error as e:
                raise WatchError(f"the query does not run: {e.diag.message_primary}") from None
            finally:
                conn.rollback()
            assert cur.description is not None
            result = [d.name for d in cur.description]
            for option, names in (("--key", key or ()), ("--ignore-columns", ignore_columns)):
                unknown = [n for n in names if n not in result]
                if unknown:
                    raise WatchError(
                        f"{option}: the query has no column {show_name(unknown[0])}"
                        f" (its columns: {', '.join(show_name(c) for c in result)})"
                    )
            key = tuple(key or ())
        for k in key:
            if k in ignore_columns:
                raise WatchError(f"key column {show_name(k)} cannot be in --ignore-columns")
        if not key:
            notes.append("no key: rows are compared as a whole, and identified by their content")
        watch_name = _check_watch_name(
            name
            if name is not None
            else default_watch_name(schema_name or "", table_name or "")
            if table_name
            else ""
        )
        options: dict[str, Any] = dict(schedule.to_options()) if schedule else {}
        if initial_events:
            options["initial_events"] = True
        watch = Watch(
            name=watch_name,
            schema_name=schema_name,
            table_name=table_name,
            method="snapshot",
            key_columns=tuple(key),
            columns=tuple(result) if columns is not None else None,
            ignore_columns=tuple(ignore_columns),
            query=query,
            options=options,
            retain=retain,
        )
        with conn.transaction():
            _lock_registry(conn, settings.schema)
            if registry.get_watch(conn, settings.schema, watch_name) is not None:
                raise WatchError(
                    f"a watch named {watch_name!r} exists already; remove it first or choose"
                    " another name with --name"
                )
            registry.add_watch(conn, settings.schema, watch)
            stored = registry.get_watch(conn, settings.schema, watch_name)
        conn.commit()
    if schedule is not None:
        notes.append(f"runs {schedule.describe()} while `pgherald run` runs")
    else:
        notes.append("no schedule: run it with `pgherald snapshot run` (e.g. from cron)")
    if first_run:
        from pgherald import snapshots

        outcome = snapshots.run_watch(settings, watch_name)
        notes.append(f"first run: {outcome.describe()}")
    return AddedWatch(stored or watch, "", tuple(notes))


def add_listen_watch(
    settings: Settings, name: str, channels: Sequence[str], retain: str | None = None
) -> AddedWatch:
    """Stores a watch whose events are the notifications sent on ``channels``.

    Channel names are taken exactly as written (they are not SQL names to fold).
    """
    if not channels:
        raise WatchError("a listen watch needs at least one --channel")
    for channel in channels:
        try:
            check_channel(channel)
        except ConfigError as e:
            raise WatchError(str(e)) from None
    unique = tuple(dict.fromkeys(channels))
    watch = Watch(
        name=_check_watch_name(name),
        schema_name=None,
        table_name=None,
        method="listen",
        options={"channels": list(unique)},
        retain=_retain(retain),
    )
    with connect(settings) as conn:
        with conn.transaction():
            migrations.require_current(conn, settings.schema)
            _lock_registry(conn, settings.schema)
            if registry.get_watch(conn, settings.schema, watch.name) is not None:
                raise WatchError(
                    f"a watch named {watch.name!r} exists already; remove it first or choose"
                    " another name"
                )
            registry.add_watch(conn, settings.schema, watch)
            stored = registry.get_watch(conn, settings.schema, watch.name)
        conn.commit()
    note = (
        "notifications are stored while `pgherald run` listens; NOTIFY is at most once, so"
        " those sent while it is stopped are not seen"
    )
    return AddedWatch(stored or watch, "", (note,))


def ensure_slot(settings: Settings) -> bool:
    """Creates the replication slot when capture has never run, so changes are kept from now.

    From the moment a logical watch exists, PostgreSQL retains every change for pgherald,
    even if ``pgherald run`` starts later. A slot that is missing while the change log holds
    a checkpoint is *not* recreated here: that is a gap, which capture reports (and
    ``pgherald run --resync`` accepts). Returns whether a slot was created.
    """
    with connect(settings, autocommit=True) as conn:
        if logical_admin.slot_info(conn, settings.slot) is not None:
            return False
        if (
            checkpoints.load_checkpoint(conn, settings.schema, checkpoint_name(settings.slot))
            is not None
        ):
            return False
        logical_admin.create_slot(conn, settings.slot)
        return True


def _add_watch(
    conn: psycopg.Connection[Any],
    settings: Settings,
    schema_name: str,
    table_name: str,
    *,
    columns: tuple[str, ...] | None,
    ignore_columns: tuple[str, ...],
    key: tuple[str, ...] | None,
    name: str | None,
    method: str,
    replica_identity_full: bool,
    snapshot: bool,
    retain: str | None = None,
) -> AddedWatch:
    if method not in TABLE_METHODS:
        raise WatchError(
            f"unknown capture method {method!r}; use one of {', '.join(TABLE_METHODS)}"
        )
    if method not in AVAILABLE_METHODS:
        raise WatchError(
            f"capture method {method!r} is not available in this version of pgherald;"
            f" use {' or '.join(AVAILABLE_METHODS)}"
        )
    notes: list[str] = []
    if method == "auto":
        choice = choose_method(conn, settings.slot)
        method = choice.method
        notes.append(choice.explain())
    if method == "trigger" and replica_identity_full:
        raise WatchError(
            "--replica-identity-full is for logical capture; trigger capture always has"
            " whole old rows"
        )
    if method == "trigger" and snapshot:
        raise WatchError("--snapshot is for logical capture; trigger capture starts from now")
    info = table_info(conn, schema_name, table_name)
    if info.kind not in ("r", "p"):
        raise WatchError(
            f"{info.shown} is a {_KINDS.get(info.kind, 'relation')}, and {method} capture"
            " watches tables only"
        )
    if columns is not None:
        if not columns:
            raise WatchError("--columns is empty: name at least one column, or leave it out")
        _check_columns(info, columns, "--columns")
    _check_columns(info, ignore_columns, "--ignore-columns")
    if key is not None:
        if not key:
            raise WatchError("--key is empty: name the columns that identify a row")
        _check_columns(info, key, "--key")
    key_columns = key or info.primary_key or info.identity_index
    if not key_columns:
        raise WatchError(
            f"table {info.shown} has no primary key: pass --key with the columns that identify"
            " a row (e.g. --key id), or add a primary key"
        )
    for column in key_columns:
        if column in ignore_columns:
            raise WatchError(f"key column {show_name(column)} cannot be in --ignore-columns")
    if columns is not None:
        both = [c for c in columns if c in ignore_columns]
        if both:
            raise WatchError(
                f"column {show_name(both[0])} is both in --columns and in --ignore-columns"
            )
    watch_name = _check_watch_name(
        name if name is not None else default_watch_name(schema_name, table_name)
    )
    if registry.get_watch(conn, settings.schema, watch_name) is not None:
        raise WatchError(
            f"a watch named {watch_name!r} exists already; remove it first or choose another"
            " name with --name"
        )
    for other in registry.list_watches(conn, settings.schema):
        if (other.schema_name, other.table_name, other.method) == (schema_name, table_name, method):
            raise WatchError(
                f"table {info.shown} is already watched by {other.name!r} with {method} capture"
            )

    identity = info.replica_identity
    if method == "logical":
        if replica_identity_full and identity != "full":
            try:
                logical_admin.set_replica_identity_full(conn, schema_name, table_name)
            except psycopg.errors.InsufficientPrivilege as e:
                raise WatchError(
                    f"cannot set REPLICA IDENTITY FULL on {info.shown}: {e.diag.message_primary}"
                    " (only the table's owner can)"
                ) from None
            notes.append(f"set REPLICA IDENTITY FULL on {info.shown}: updates carry whole old rows")
            identity = "full"
        else:
            notes.extend(_identity_notes(info, identity))
        wal_level = conn.execute("SELECT current_setting('wal_level')").fetchone()
        if wal_level is not None and wal_level[0] != "logical":
            notes.append(
                f"wal_level is {wal_level[0]!r}: logical capture needs 'logical'"
                " (ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)"
            )
    if key is not None and not any(set(u) <= set(key) for u in info.unique_keys):
        notes.append(
            f"no unique index covers the key ({', '.join(show_name(k) for k in key)}):"
            " pgherald assumes that it identifies one row"
        )

    watch = Watch(
        name=watch_name,
        schema_name=schema_name,
        table_name=table_name,
        method=method,
        key_columns=tuple(key_columns),
        columns=columns,
        ignore_columns=ignore_columns,
        options={"snapshot": True} if snapshot else {},
        retain=_retain(retain),
    )
    registry.add_watch(conn, settings.schema, watch)
    if method == "logical":
        _sync_publication(conn, settings)
    if method == "trigger":
        _install_triggers(conn, settings, watch, info)
        notes.append(
            f"capture triggers installed on {info.shown}: changes are queued from now on, in"
            " the writers' own transactions; updates carry whole old rows"
        )
    stored = registry.get_watch(conn, settings.schema, watch_name)
    return AddedWatch(stored or watch, identity, tuple(notes))


def _install_triggers(
    conn: psycopg.Connection[Any], settings: Settings, watch: Watch, info: TableInfo
) -> None:
    watched = None
    if watch.columns is not None:
        wanted = set(watch.columns) | set(watch.key_columns)
        watched = [c for c in info.columns if c in wanted]
    try:
        trigger_admin.install_triggers(
            conn,
            settings.schema,
            watch.name,
            watch.schema_name or "",
            watch.table_name or "",
            ignore_columns=watch.ignore_columns,
            watched_columns=watched,
        )
    except psycopg.errors.InsufficientPrivilege as e:
        raise WatchError(
            f"cannot create triggers on {info.shown}: {e.diag.message_primary}"
            " (trigger capture needs the table's owner, or a role with the TRIGGER privilege)"
        ) from None


def _identity_notes(info: TableInfo, identity: str) -> list[str]:
    """Says what old values updates will carry, and refuses identities that break writes.

    A published table with REPLICA IDENTITY NOTHING, or DEFAULT without a primary key,
    makes PostgreSQL reject every UPDATE and DELETE on it: adding such a table to the
    publication would break the application that writes it.
    """
    if identity == "nothing" or (identity == "default" and not info.primary_key):
        why = "REPLICA IDENTITY NOTHING" if identity == "nothing" else "no primary key"
        raise WatchError(
            f"table {info.shown} has {why}: once published, PostgreSQL would reject its"
            " UPDATEs and DELETEs; pass --replica-identity-full (or add a primary key)"
        )
    if identity == "index" and not info.identity_index:
        raise WatchError(
            f"table {info.shown} has REPLICA IDENTITY USING INDEX on a missing index;"
            " pass --replica-identity-full"
        )
    if identity == "default":
        return [
            f"replica identity of {info.shown} is DEFAULT: updates carry the old primary key"
            " only, so pgherald takes old values from its change log; pass"
            " --replica-identity-full to have PostgreSQL send whole old rows"
        ]
    if identity == "index":
        return [
            f"replica identity of {info.shown} is an index: updates carry the old values of"
            " its columns only"
        ]
    return [f"replica identity of {info.shown} is FULL: updates carry whole old rows"]


def sync_declared_watches(settings: Settings) -> tuple[str, ...]:
    """Adds the configuration file's ``[[watch]]`` entries that are not registered yet, and
    sets the ``retain`` of those that are to the one the file gives them, if it does."""
    added: list[str] = []
    for spec in settings.watches:
        schema_name, table_name = parse_table_name(spec.table)
        name = spec.name or default_watch_name(schema_name, table_name)
        with connect(settings) as conn:
            found = registry.get_watch(conn, settings.schema, name)
            if found is not None and spec.retain is not None and found.retain != spec.retain:
                registry.set_watch_retain(conn, settings.schema, name, spec.retain)
                conn.commit()
        if found is None:
            add_watch_from_spec(settings, spec)
            added.append(name)
    return tuple(added)


def add_watch_from_spec(settings: Settings, spec: WatchSpec) -> AddedWatch:
    return add_watch(
        settings,
        spec.table,
        columns=spec.columns,
        ignore_columns=spec.ignore_columns,
        key=spec.key,
        name=spec.name,
        method=spec.method,
        replica_identity_full=spec.replica_identity_full,
        snapshot=spec.snapshot,
        retain=spec.retain,
    )


def list_watches(settings: Settings) -> list[Watch]:
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        return list(registry.list_watches(conn, settings.schema))


def remove_watch(settings: Settings, name: str) -> Watch:
    """Removes a watch and takes its table out of the publication, in one transaction.

    Its events stay in the change log; the table's replica identity is left as it is.
    """
    with connect(settings) as conn:
        with conn.transaction():
            migrations.require_current(conn, settings.schema)
            _lock_registry(conn, settings.schema)
            watch = registry.get_watch(conn, settings.schema, name)
            if watch is None:
                raise WatchError(f"no watch named {name!r} (see `pgherald watch list`)")
            registry.remove_watch(conn, settings.schema, name)
            if watch.method == "trigger" and watch.schema_name and watch.table_name:
                trigger_admin.remove_triggers(
                    conn, settings.schema, watch.schema_name, watch.table_name
                )
                trigger_admin.forget_queued(conn, settings.schema, watch.name)
            if watch.method == "snapshot":
                conn.execute(
                    sql.SQL("DROP TABLE IF EXISTS {}").format(
                        sql.Identifier(settings.schema, baseline_table(watch.name))
                    )
                )
                # Its row count goes with it: a watch added later under the same name
                # must not take its new baseline for this one, lost.
                checkpoints.delete_checkpoint(
                    conn, settings.schema, baseline_checkpoint(watch.name)
                )
            if logical_admin.publication_exists(conn, settings.publication):
                _sync_publication(conn, settings)
        conn.commit()
    return watch


# -- reading the change log ----------------------------------------------------------------------


def read_changes(
    settings: Settings,
    *,
    watch: str | None = None,
    since: str | None = None,
    limit: int | None = None,
    op: str | None = None,
    page: int = 1000,
) -> Iterator[StoredEvent]:
    """The change log in log order, after ``since`` (an event id or a log id), lazily paged.

    ``since`` as digits is a log id (the ``id`` the change log gives each event); anything
    else is an event id (``L/…``, ``T/…``, ``S/…``). Unknown ids are an error rather than an
    empty answer, so a script that lost its place finds out.
    """
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        log = ChangeLog(conn, settings.schema)
        if watch is not None and registry.get_watch(conn, settings.schema, watch) is None:
            raise WatchError(f"no watch named {watch!r} (see `pgherald watch list`)")
        after = 0
        if since:
            if since.isdigit():
                after = int(since)
            else:
                found = log.find_id(since)
                if found is None:
                    raise WatchError(f"no event {since!r} in the change log")
                after = found
        remaining = limit
        while remaining is None or remaining > 0:
            size = page if remaining is None else min(page, remaining)
            batch = log.read(watch=watch, after_id=after, limit=size, op=op)
            conn.commit()
            if not batch:
                return
            yield from batch
            after = batch[-1].id
            if remaining is not None:
                remaining -= len(batch)
            if len(batch) < size:
                return


__all__ = [
    "AVAILABLE_METHODS",
    "AddedWatch",
    "InitResult",
    "MigrateResult",
    "TableInfo",
    "TableMethod",
    "UninstallResult",
    "add_watch",
    "add_watch_from_spec",
    "default_watch_name",
    "init",
    "list_watches",
    "migrate",
    "parse_column_list",
    "parse_table_name",
    "read_changes",
    "remove_watch",
    "show_name",
    "split_names",
    "sync_declared_watches",
    "table_info",
    "uninstall",
]


# -- capture status ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureStatus:
    """What an operator asks first: is the slot there, how much WAL does it hold, how far behind."""

    slot: logical_admin.SlotInfo | None
    checkpoint: str | None
    events: int
    watches: tuple[Watch, ...]
    queued: int = 0
    """Changes waiting in the trigger queue."""
    oldest_queued: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        slot = self.slot
        return {
            "trigger_queue": {
                "depth": self.queued,
                "oldest": self.oldest_queued.isoformat() if self.oldest_queued else None,
            },
            "slot": None
            if slot is None
            else {
                "name": slot.name,
                "active": slot.active,
                "wal_status": slot.wal_status,
                "confirmed_flush_lsn": slot.confirmed_flush_lsn,
                "restart_lsn": slot.restart_lsn,
                "retained_wal_bytes": slot.retained_bytes,
                "lag_bytes": slot.lag_bytes,
            },
            "checkpoint": self.checkpoint,
            "events": self.events,
            "watches": [
                {
                    "name": w.name,
                    "method": w.method,
                    "changes_seen": w.changes_seen,
                    "last_run_at": w.last_run_at.isoformat() if w.last_run_at else None,
                    "last_error": w.last_error,
                }
                for w in self.watches
            ],
        }


def status(settings: Settings) -> CaptureStatus:
    with connect(settings, autocommit=True) as conn:
        migrations.require_current(conn, settings.schema)
        slot = logical_admin.slot_info(conn, settings.slot)
        checkpoint = checkpoints.load_checkpoint(
            conn, settings.schema, checkpoint_name(settings.slot)
        )
        events = ChangeLog(conn, settings.schema).last_id()
        found = tuple(registry.list_watches(conn, settings.schema))
        queued, oldest = trigger_admin.queue_depth(conn, settings.schema)
    return CaptureStatus(slot, checkpoint, events, found, queued, oldest)
