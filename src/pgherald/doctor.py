"""``pgherald doctor``: what this database allows, and which capture methods can work here.

People meet pgherald on databases they do not fully control (managed services, a colleague's
server, a role without privileges). Rather than letting them find out one failed command
at a time, the doctor looks at everything capture needs, says what is fine and what is
missing with the command that fixes it, and concludes which capture methods are possible
and why the others are not. It only reads the catalogs: it never changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import psycopg

from pgherald.admin import AVAILABLE_METHODS, default_watch_name, parse_table_name, show_name
from pgherald.config import TABLE_METHODS, Settings
from pgherald.db.connect import connect
from pgherald.errors import PgHeraldError
from pgherald.methods import choose_method
from pgherald.sources import logical_admin
from pgherald.store import migrations
from pgherald.store import watches as registry

Status = Literal["ok", "info", "warn", "fail"]
MIN_LOGICAL_VERSION: Final = 100000
"""pgoutput and publications arrived in PostgreSQL 10."""
STREAMING_VERSION: Final = 140000
"""Protocol 2 streams large in-progress transactions from PostgreSQL 14 on."""


@dataclass(frozen=True)
class Check:
    """One thing the doctor looked at: ``ok``, ``info``, ``warn`` (some method suffers) or
    ``fail`` (something is broken for every method)."""

    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class MethodVerdict:
    """Whether a capture method can work on this database, and if not, every reason why."""

    method: str
    possible: bool
    reasons: tuple[str, ...] = ()
    available: bool = True
    """False when the database allows it but this version of pgherald cannot run it yet."""

    @property
    def usable(self) -> bool:
        return self.possible and self.available


@dataclass(frozen=True)
class DoctorReport:
    target: str
    server_version: str
    checks: tuple[Check, ...]
    methods: tuple[MethodVerdict, ...]
    auto: str = ""
    """What ``method = "auto"`` picks on this database, and why (``methods.choose_method``)."""

    @property
    def usable_methods(self) -> tuple[str, ...]:
        return tuple(m.method for m in self.methods if m.usable)

    @property
    def ok(self) -> bool:
        """True when at least one capture method can work here."""
        return bool(self.usable_methods)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["usable_methods"] = list(self.usable_methods)
        out["ok"] = self.ok
        return out


@dataclass
class _Table:
    """A watched (or declared) table and what the current role may do with it."""

    watch: str
    schema: str
    table: str
    method: str
    exists: bool = False
    kind: str = ""
    owned: bool = False
    can_select: bool = False
    can_trigger: bool = False
    replica_identity: str = ""
    has_primary_key: bool = False
    published: bool = False

    @property
    def shown(self) -> str:
        return show_name(self.schema, self.table)


@dataclass
class _Facts:
    version_num: int = 0
    version: str = ""
    user: str = ""
    database: str = ""
    superuser: bool = False
    replication: bool = False
    create_on_db: bool = False
    wal_level: str = ""
    max_slots: int = 0
    used_slots: int = 0
    max_senders: int = 0
    used_senders: int = 0
    slot: logical_admin.SlotInfo | None = None
    store_version: int | None = None
    schema_exists: bool = False
    schema_usable: bool = False
    publication_exists: bool = False
    publication_owned: bool = False
    tables: list[_Table] = field(default_factory=list)
    watch_error: str | None = None


_SERVER_QUERY: Final = """
SELECT current_setting('server_version_num')::int, current_setting('server_version'),
       current_user, current_database(), r.rolsuper, r.rolreplication,
       has_database_privilege(current_database(), 'CREATE'),
       current_setting('wal_level'),
       current_setting('max_replication_slots')::int,
       (SELECT count(*) FROM pg_replication_slots)::int,
       current_setting('max_wal_senders')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int
FROM pg_roles r WHERE r.rolname = current_user
"""

_SCHEMA_QUERY: Final = """
SELECT has_schema_privilege(n.oid, 'USAGE') AND has_schema_privilege(n.oid, 'CREATE')
FROM pg_namespace n WHERE n.nspname = %s
"""

_PUBLICATION_QUERY: Final = """
SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = %s
"""

_TABLE_QUERY: Final = """
SELECT c.relkind::text, pg_has_role(c.relowner, 'USAGE'),
       has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'TRIGGER'),
       c.relreplident::text,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
               WHERE pr.prrelid = c.oid AND p.pubname = %s)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""


def _gather(conn: psycopg.Connection[Any], settings: Settings) -> _Facts:
    facts = _Facts()
    row = conn.execute(_SERVER_QUERY).fetchone()
    assert row is not None  # current_user is always in pg_roles
    (
        facts.version_num,
        facts.version,
        facts.user,
        facts.database,
        facts.superuser,
        facts.replication,
        facts.create_on_db,
        facts.wal_level,
        facts.max_slots,
        facts.used_slots,
        facts.max_senders,
        facts.used_senders,
    ) = row
    facts.slot = logical_admin.slot_info(conn, settings.slot)
    schema_row = conn.execute(_SCHEMA_QUERY, (settings.schema,)).fetchone()
    facts.schema_exists = schema_row is not None
    facts.schema_usable = bool(schema_row and schema_row[0])
    if facts.schema_exists and facts.schema_usable:
        facts.store_version = migrations.current_version(conn, settings.schema)
    pub = conn.execute(_PUBLICATION_QUERY, (settings.publication,)).fetchone()
    facts.publication_exists = pub is not None
    facts.publication_owned = bool(pub and pub[0])
    facts.tables = _tables(conn, settings, facts)
    return facts


def _tables(conn: psycopg.Connection[Any], settings: Settings, facts: _Facts) -> list[_Table]:
    """The registry's watches (when the store is current) and the configuration's."""
    found: dict[str, _Table] = {}
    if facts.store_version == migrations.LATEST_VERSION:
        try:
            for w in registry.list_watches(conn, settings.schema):
                if w.schema_name and w.table_name:
                    found[w.name] = _Table(w.name, w.schema_name, w.table_name, w.method)
        except psycopg.Error as e:
            facts.watch_error = e.diag.message_primary or type(e).__name__
    for spec in settings.watches:
        try:
            schema, table = parse_table_name(spec.table)
        except PgHeraldError as e:
            facts.watch_error = str(e)
            continue
        name = spec.name or default_watch_name(schema, table)
        found.setdefault(name, _Table(name, schema, table, spec.method or settings.method))
    for t in found.values():
        row = conn.execute(_TABLE_QUERY, (settings.publication, t.schema, t.table)).fetchone()
        if row is None:
            continue
        t.exists = True
        (t.kind, t.owned, t.can_select, t.can_trigger, ident, t.has_primary_key, t.published) = row
        t.replica_identity = logical_admin.REPLICA_IDENTITIES[ident]
    return list(found.values())


# -- judging the facts ------------------------------------------------------------------------


def _checks(facts: _Facts, settings: Settings) -> list[Check]:
    checks = [
        Check(
            "server",
            "ok" if facts.version_num >= MIN_LOGICAL_VERSION else "warn",
            f"PostgreSQL {facts.version}"
            + (
                ""
                if facts.version_num >= STREAMING_VERSION
                else " (large transactions are decoded whole: streaming needs 14+)"
            ),
        ),
        Check(
            "wal_level",
            "ok" if facts.wal_level == "logical" else "warn",
            f"wal_level = {facts.wal_level}"
            + (
                ""
                if facts.wal_level == "logical"
                else " (logical capture needs 'logical': ALTER SYSTEM SET wal_level = logical,"
                " then restart PostgreSQL)"
            ),
        ),
    ]
    if facts.superuser:
        role = Check("role", "ok", f"{facts.user!r} is a superuser")
    elif facts.replication:
        role = Check("role", "ok", f"{facts.user!r} has REPLICATION")
    else:
        role = Check(
            "role",
            "warn",
            f"{facts.user!r} has no REPLICATION (logical capture needs it:"
            f" ALTER ROLE {show_name(facts.user)} REPLICATION)",
        )
    checks.append(role)
    checks.append(
        Check(
            "database",
            "ok" if facts.create_on_db or facts.superuser else "warn",
            f"CREATE on database {facts.database!r}: "
            + (
                "yes"
                if facts.create_on_db or facts.superuser
                else f"no (needed to install the store and the publication: GRANT CREATE ON"
                f" DATABASE {show_name(facts.database)} TO {show_name(facts.user)})"
            ),
        )
    )
    checks.append(_slot_check(facts, settings))
    free_senders = facts.max_senders - facts.used_senders
    checks.append(
        Check(
            "wal senders",
            "ok" if free_senders > 0 or _slot_active(facts) else "warn",
            f"{facts.used_senders} of max_wal_senders = {facts.max_senders} in use",
        )
    )
    checks.append(_store_check(facts, settings))
    checks.append(
        Check(
            "publication",
            "info",
            f"publication {settings.publication!r} "
            + (
                f"exists{'' if facts.publication_owned else ' (owned by another role)'}"
                if facts.publication_exists
                else "does not exist yet (`pgherald watch add` creates it)"
            ),
        )
    )
    if facts.watch_error:
        checks.append(Check("watches", "warn", f"cannot read the watches: {facts.watch_error}"))
    if not facts.tables:
        checks.append(Check("watches", "info", "no watches yet"))
    for t in facts.tables:
        checks.append(_table_check(t, facts))
    return checks


def _slot_active(facts: _Facts) -> bool:
    return facts.slot is not None and facts.slot.active


def _slot_check(facts: _Facts, settings: Settings) -> Check:
    used = f"{facts.used_slots} of max_replication_slots = {facts.max_slots} in use"
    slot = facts.slot
    if slot is None:
        status: Status = "ok" if facts.used_slots < facts.max_slots else "warn"
        return Check("replication slots", status, f"{used}; slot {settings.slot!r} not created yet")
    if slot.database != facts.database:
        return Check(
            "replication slots",
            "warn",
            f"{used}; slot {settings.slot!r} belongs to database {slot.database!r}:"
            " choose another name with --slot",
        )
    if slot.wal_status == "lost":
        return Check(
            "replication slots",
            "warn",
            f"{used}; slot {settings.slot!r} was invalidated (its WAL is gone):"
            " changes were lost; `pgherald run --resync` starts again",
        )
    state = f"active (pid {slot.active_pid})" if slot.active else "inactive"
    retained = (
        f", retains {slot.retained_bytes / 1048576:.1f} MB of WAL"
        if slot.retained_bytes is not None
        else ""
    )
    return Check("replication slots", "ok", f"{used}; slot {settings.slot!r} {state}{retained}")


def _store_check(facts: _Facts, settings: Settings) -> Check:
    schema = show_name(settings.schema)
    latest = migrations.LATEST_VERSION
    if facts.schema_exists and not facts.schema_usable:
        return Check(
            "store",
            "fail",
            f"schema {schema} exists but {facts.user!r} cannot use it or create in it",
        )
    version = facts.store_version
    if version is None:
        how = (
            "run `pgherald init`"
            if facts.create_on_db or facts.superuser or facts.schema_usable
            else "it cannot be installed without CREATE on the database"
        )
        return Check(
            "store", "warn", f"pgherald's store is not installed in schema {schema}: {how}"
        )
    if version < latest:
        return Check(
            "store",
            "fail",
            f"store in schema {schema} is at version {version}, this pgherald needs {latest}:"
            " run `pgherald migrate`",
        )
    if version > latest:
        return Check(
            "store",
            "fail",
            f"store in schema {schema} is at version {version}, newer than this pgherald"
            f" ({latest}): upgrade pgherald",
        )
    return Check("store", "ok", f"installed in schema {schema}, version {version} (current)")


def _table_check(t: _Table, facts: _Facts) -> Check:
    name = f"watch {t.watch!r}"
    if not t.exists:
        return Check(name, "fail", f"table {t.shown} does not exist")
    parts = [f"{t.method} capture of {t.shown}"]
    status: Status = "ok"
    if t.owned or facts.superuser:
        parts.append("owned")
    else:
        parts.append(
            f"not owned by {facts.user!r}" + (" (has TRIGGER privilege)" if t.can_trigger else "")
        )
        if t.method in ("logical", "auto") and not t.published:
            status = "warn"
        if t.method in ("trigger", "auto") and not t.can_trigger:
            status = "warn"
    parts.append(f"replica identity {t.replica_identity}")
    if not t.has_primary_key:
        parts.append("no primary key")
    if not t.can_select:
        parts.append("no SELECT privilege")
        if t.method == "snapshot":
            status = "warn"
    return Check(name, status, ", ".join(parts))


def _verdicts(facts: _Facts, settings: Settings) -> list[MethodVerdict]:
    store: list[str] = []
    if facts.schema_exists and not facts.schema_usable:
        store.append(f"the role cannot use or create in schema {show_name(settings.schema)}")
    elif facts.store_version is None and not (facts.create_on_db or facts.superuser):
        store.append(
            f"the store cannot be installed: {facts.user!r} lacks CREATE on database"
            f" {facts.database!r}"
        )
    elif facts.store_version is not None and facts.store_version != migrations.LATEST_VERSION:
        store.append(
            "the store's version does not match this pgherald"
            + (
                " (run `pgherald migrate`)"
                if facts.store_version < migrations.LATEST_VERSION
                else ""
            )
        )
    missing = [t for t in facts.tables if not t.exists]
    store += [f"watched table {t.shown} does not exist" for t in missing]

    logical = list(store)
    if facts.version_num < MIN_LOGICAL_VERSION:
        logical.append(f"PostgreSQL {facts.version} has no pgoutput (needs 10 or newer)")
    if facts.wal_level != "logical":
        logical.append(f"wal_level is {facts.wal_level!r}, not 'logical'")
    if not (facts.superuser or facts.replication):
        logical.append(f"role {facts.user!r} has no REPLICATION attribute")
    slot = facts.slot
    if slot is None and facts.used_slots >= facts.max_slots:
        logical.append(f"no free replication slot ({facts.used_slots} of {facts.max_slots} in use)")
    elif slot is not None and slot.database != facts.database:
        logical.append(f"slot {settings.slot!r} belongs to database {slot.database!r}")
    elif slot is not None and slot.wal_status == "lost":
        logical.append(f"slot {settings.slot!r} was invalidated (needs `pgherald run --resync`)")
    if not _slot_active(facts) and facts.used_senders >= facts.max_senders:
        logical.append(f"no free WAL sender ({facts.used_senders} of {facts.max_senders} in use)")
    if not facts.superuser:
        if not facts.publication_exists and not facts.create_on_db:
            logical.append("the role cannot create the publication (no CREATE on the database)")
        elif facts.publication_exists and not facts.publication_owned:
            logical.append(f"publication {settings.publication!r} belongs to another role")
        logical += [
            f"role does not own {t.shown} (needed to publish it)"
            for t in facts.tables
            if t.exists and t.method in ("logical", "auto") and not t.owned and not t.published
        ]

    trigger = list(store)
    if not facts.superuser:
        trigger += [
            f"no TRIGGER privilege on {t.shown}"
            for t in facts.tables
            if t.exists and t.method in ("trigger", "auto") and not (t.owned or t.can_trigger)
        ]

    snapshot = list(store)
    snapshot += [
        f"no SELECT privilege on {t.shown}"
        for t in facts.tables
        if t.exists and t.method == "snapshot" and not t.can_select
    ]

    reasons = {"logical": logical, "trigger": trigger, "snapshot": snapshot}
    return [
        MethodVerdict(
            method,
            possible=not reasons[method],
            reasons=tuple(reasons[method]),
            available=method in AVAILABLE_METHODS,
        )
        for method in TABLE_METHODS
        if method != "auto"
    ]


def diagnose(settings: Settings) -> DoctorReport:
    """Connects, looks, and concludes; raises ``ConnectionFailed`` when it cannot connect."""
    with connect(settings, autocommit=True) as conn:
        facts = _gather(conn, settings)
        auto = choose_method(conn, settings.slot).explain()
    target = f"{settings.redacted_dsn()} (database {facts.database!r}, user {facts.user!r})"
    return DoctorReport(
        target=target,
        server_version=facts.version,
        checks=tuple(_checks(facts, settings)),
        methods=tuple(_verdicts(facts, settings)),
        auto=auto,
    )


def render(report: DoctorReport) -> Sequence[str]:
    """The report as lines for a terminal."""
    marks = {"ok": "ok  ", "info": "info", "warn": "warn", "fail": "FAIL"}
    lines = [f"pgherald doctor: {report.target}"]
    lines += [f"  [{marks[c.status]}] {c.name}: {c.detail}" for c in report.checks]
    lines.append("capture methods:")
    for m in report.methods:
        if m.usable:
            lines.append(f"  {m.method}: possible")
        elif m.possible:
            lines.append(
                f"  {m.method}: the database allows it, but this pgherald cannot run it yet"
            )
        else:
            lines.append(f"  {m.method}: not possible: {'; '.join(m.reasons)}")
    if report.auto:
        lines.append(f"  {report.auto}")
    if report.ok:
        lines.append(f"conclusion: capture can use {', '.join(report.usable_methods)}")
    else:
        lines.append("conclusion: no capture method can work here; fix one of the reasons above")
    return lines
