"""The console's pages: dashboard, change browser, event and row history, watches,
subscriptions, deliveries and users.

Every handler runs as ``console.page`` arranges: signed in, role checked, CSRF checked for
POST, in a worker thread with a store connection. A viewer's allow-list is applied to
everything read, and what a viewer may not read is answered exactly as what does not
exist (404), so guessing names or ids tells nothing.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Final

from starlette.responses import RedirectResponse, Response

from pgherald import admin, retain, routing_admin, selfservice
from pgherald.db.types import TypeRegistry
from pgherald.errors import PgHeraldError
from pgherald.events.model import OPERATIONS
from pgherald.schedule import Schedule
from pgherald.sources import logical_admin
from pgherald.store import browse, deliveries, own, users
from pgherald.store import watches as registry
from pgherald.store.changelog import ChangeLog
from pgherald.store.watches import Watch
from pgherald.web import accounts
from pgherald.web.console import Ctx, not_found, page
from pgherald.web.views import FULL_LIMIT, LIST_WIDTH, row_key_from_text, view, when

PAGE_SIZE: Final = 50
MAX_TEXT: Final = 200
DELIVERY_STATUSES: Final = ("pending", "delivering", "delivered", "failed", "dead")


def redirect(path: str, **params: str) -> Response:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v})
    return RedirectResponse(path + (f"?{query}" if query else ""), status_code=303)


def _fmt(ctx: Ctx, none: str = "") -> Callable[[datetime | None], str]:
    """Times for a template, in the configured locale and time zone."""
    formatter = ctx.console.formatter()
    return lambda d: formatter.when(d) if d else none


def _readable_watches(ctx: Ctx) -> list[Watch]:
    found = registry.list_watches(ctx.conn, ctx.schema)
    return [w for w in found if ctx.viewer.may_read(w.name)]


# -- dashboard -------------------------------------------------------------------------------


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    return f"{duration(now - moment)} ago"


def duration(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def size(n: int) -> str:
    for unit, step in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class WatchRow:
    watch: Watch
    last_run: str
    last_run_iso: str
    lag: str
    behind: bool
    changes_today: int
    errors_today: int
    last_change: str


def _lag(
    w: Watch, a: browse.Activity | None, slot: logical_admin.SlotInfo | None, now: datetime
) -> tuple[str, bool]:
    """How far capture is behind for this watch, in its method's own terms."""
    if w.method == "logical":
        if slot is None:
            return "no replication slot", True
        behind = slot.lag_bytes or 0
        return ("up to date", False) if behind == 0 else (f"{size(behind)} of WAL", True)
    if w.method == "trigger":
        if a is None or a.queued == 0:
            return "up to date", False
        return f"{a.queued} queued, oldest {ago(a.oldest_queued, now)}", True
    if w.method == "snapshot":
        schedule = Schedule.from_options(dict(w.options))
        if schedule is None:
            return "runs on demand", False
        created = w.created_at or now
        due = schedule.next_run(w.last_run_at, created)
        if due <= now:
            return f"due for {duration(now - due)}", now - due > timedelta(minutes=1)
        return f"next run in {duration(due - now)}", False
    return "—", False


def _dashboard_rows(ctx: Ctx) -> list[WatchRow]:
    readable = _readable_watches(ctx)
    activity = browse.activity(ctx.conn, ctx.schema, [w.name for w in readable])
    slot = None
    if any(w.method == "logical" for w in readable):
        slot = logical_admin.slot_info(ctx.conn, ctx.settings.slot)
    now = datetime.now(UTC)
    formatter = ctx.console.formatter()
    rows = []
    for w in readable:
        a = activity.get(w.name)
        lag, behind = _lag(w, a, slot, now)
        shown, iso = when(w.last_run_at, formatter) if w.last_run_at else ("never", "")
        rows.append(
            WatchRow(
                watch=w,
                last_run=shown,
                last_run_iso=iso,
                lag=lag,
                behind=behind,
                changes_today=a.changes_today if a else 0,
                errors_today=a.errors_today if a else 0,
                last_change=ago(a.last_change_at if a else None, now),
            )
        )
    return rows


@page()
def dashboard(ctx: Ctx) -> Response:
    rows = _dashboard_rows(ctx)
    template = "_watch_rows.html" if ctx.request.query_params.get("partial") else "dashboard.html"
    return ctx.render(template, rows=rows, active="dashboard")


@page()
def watch_detail(ctx: Ctx) -> Response:
    name = ctx.param("name")
    if name is None or not ctx.viewer.may_read(name):
        return not_found(ctx, "There is no such watch.")
    w = registry.get_watch(ctx.conn, ctx.schema, name)
    if w is None:
        return not_found(ctx, "There is no such watch.")
    from pgherald.store import errors as error_store
    from pgherald.store import runs as run_store

    runs = run_store.list_runs(ctx.conn, ctx.schema, name, limit=20)
    errors = error_store.list_errors(ctx.conn, ctx.schema, name, limit=20)
    subs = [s for s in deliveries.list_subscriptions(ctx.conn, ctx.schema) if s.watch == name]
    return ctx.render(
        "watch.html",
        watch=w,
        runs=runs,
        errors=errors,
        subscriptions=subs if ctx.viewer.can_edit else [],
        describe=describe_filter,
        schedule=Schedule.from_options(dict(w.options)),
        retention=retain.effective(w.retain, ctx.settings.retain),
        fmt=_fmt(ctx),
        active="dashboard",
    )


# -- the change browser ----------------------------------------------------------------------


class BadFilter(PgHeraldError):
    pass


def parse_time(text: str | None, end: bool, zone: tzinfo) -> datetime | None:
    """A time from a form: ISO 8601, a ``datetime-local`` value or a date, in the
    configured time zone (``zone``) unless it says otherwise. An end time given to the
    minute (or day) includes that whole minute (or day)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadFilter(f"{text[:40]!r} is not a time; write it like 2024-05-01 14:30") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    if end:
        if len(text) == 10:
            moment += timedelta(days=1)
        elif len(text) == 16:
            moment += timedelta(minutes=1)
    return moment


@dataclass(frozen=True)
class Query:
    """The browser's filters as the page's form holds them (to fill it and build links)."""

    watch: str | None = None
    op: str | None = None
    since: str | None = None
    until: str | None = None
    key: str | None = None
    q: str | None = None

    def link(self, path: str = "/changes", **extra: Any) -> str:
        params = {k: v for k, v in vars(self).items() if v}
        params.update({k: str(v) for k, v in extra.items() if v is not None})
        return path + ("?" + urllib.parse.urlencode(params) if params else "")


def _filters(ctx: Ctx, q: Query) -> browse.Filters | None:
    """The store's filters for this viewer, or None when the watch is not theirs to read."""
    if q.op is not None and q.op not in OPERATIONS:
        raise BadFilter(f"unknown operation {q.op[:20]!r}")
    if q.q is not None and len(q.q) > MAX_TEXT:
        raise BadFilter(f"search for at most {MAX_TEXT} characters")
    zone = ctx.console.formatter().zone
    since, until = parse_time(q.since, False, zone), parse_time(q.until, True, zone)
    watches = ctx.viewer.watches
    row_key = None
    if q.watch is not None:
        if not ctx.viewer.may_read(q.watch):
            return None
        w = registry.get_watch(ctx.conn, ctx.schema, q.watch)
        if w is None:
            return None
        watches = (q.watch,)
        if q.key is not None:
            row_key = row_key_from_text(q.key, w.key_columns)
    elif q.key is not None:
        raise BadFilter("choose a watch to look for a row by its key")
    return browse.Filters(watches, q.op, since, until, row_key, q.q)


def _query(ctx: Ctx) -> Query:
    return Query(
        ctx.param("watch"),
        ctx.param("op"),
        ctx.param("since"),
        ctx.param("until"),
        ctx.param("key"),
        ctx.param("q"),
    )


def _before(ctx: Ctx) -> int | None:
    raw = ctx.param("before")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 19:
        raise BadFilter("'before' must be a log id")
    return int(raw)


@page()
def changes(ctx: Ctx) -> Response:
    q = _query(ctx)
    watches = _readable_watches(ctx)
    context: dict[str, Any] = {
        "query": q,
        "watches": watches,
        "operations": OPERATIONS,
        "timezone": ctx.console.presentation.timezone,
        "active": "changes",
    }
    try:
        before = _before(ctx)
        filters = _filters(ctx, q)
    except BadFilter as e:
        return ctx.render("browse.html", status=400, error=str(e), events=[], **context)
    if filters is None:
        return not_found(ctx, "There is no such watch.")
    log = ChangeLog(ctx.conn, ctx.schema)
    first = before is None
    latest = log.last_id() if first else 0
    found = browse.page(
        log, filters, before or browse.NEWEST, PAGE_SIZE, loader=TypeRegistry.load(ctx.conn)
    )
    r = ctx.console.renderer(ctx.conn, LIST_WIDTH)
    events = [view(e, r) for e in found.events]
    after = max([latest, *(e.id for e in events)]) if first else None
    context.update(
        events=events,
        older=q.link(before=found.older) if found.older else None,
        searched_to=found.searched_to,
        newest=q.link() if not first else None,
        live=q.link("/changes/stream", after=after) if first else None,
    )
    template = "browse.html"
    return ctx.render(template, **context)


@page()
def event_detail(ctx: Ctx) -> Response:
    log_id = int(ctx.request.path_params["log_id"])
    found = browse.event(ChangeLog(ctx.conn, ctx.schema), log_id, TypeRegistry.load(ctx.conn))
    if found is None or not ctx.viewer.may_read(found.event.watch):
        return not_found(ctx, "There is no such change.")
    e = view(found, ctx.console.renderer(ctx.conn, FULL_LIMIT), full=True)
    history = Query(watch=e.watch, key=None).link("/history", key=e.row_key) if e.row_key else None
    return ctx.render("event.html", event=e, history=history, active="changes")


@page()
def history(ctx: Ctx) -> Response:
    name, row_key = ctx.param("watch"), ctx.param("key")
    if name is None or row_key is None or not ctx.viewer.may_read(name):
        return not_found(ctx, "There is no such row.")
    w = registry.get_watch(ctx.conn, ctx.schema, name)
    if w is None:
        return not_found(ctx, "There is no such row.")
    try:
        before = _before(ctx)
    except BadFilter as e:
        return ctx.render("error.html", status=400, title="Bad request", message=str(e))
    filters = browse.Filters(watches=(name,), row_key=row_key)
    log = ChangeLog(ctx.conn, ctx.schema)
    found = browse.page(
        log, filters, before or browse.NEWEST, PAGE_SIZE, loader=TypeRegistry.load(ctx.conn)
    )
    r = ctx.console.renderer(ctx.conn, FULL_LIMIT)
    events = [view(e, r, full=True) for e in found.events]
    link = Query(watch=name).link("/history", key=row_key, before=found.older)
    return ctx.render(
        "history.html",
        watch=w,
        row_key=row_key,
        key=events[0].label if events else row_key,
        events=events,
        older=link if found.older else None,
        active="changes",
    )


# -- watches ---------------------------------------------------------------------------------

METHOD_CHOICES: Final = ("auto", "logical", "trigger", "snapshot")


def _tables(ctx: Ctx) -> list[str]:
    """Tables and views one might watch, for the form's suggestions."""
    rows = ctx.conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p', 'v', 'm')"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema', %s)"
        " AND n.nspname NOT LIKE 'pg\\_%%'"
        " ORDER BY 1, 2 LIMIT 500",
        (ctx.schema,),
    ).fetchall()
    return [admin.show_name(str(s), str(t)) for s, t in rows]


@page("editor")
def watch_form(ctx: Ctx) -> Response:
    return ctx.render(
        "watch_new.html", form={}, methods=METHOD_CHOICES, tables=_tables(ctx), active="new"
    )


@page("editor")
def watch_add(ctx: Ctx) -> Response:
    get = ctx.param
    values = {
        k: get(k) or ""
        for k in ("table", "name", "method", "columns", "ignore", "key", "cron", "every")
    }
    try:
        table = get("table")
        if table is None:
            raise PgHeraldError("name the table to watch, e.g. public.employees")
        method = get("method") or "auto"
        if method not in METHOD_CHOICES:
            raise PgHeraldError(f"unknown capture method {method[:20]!r}")
        columns = admin.parse_column_list(values["columns"]) if get("columns") else None
        ignore = admin.parse_column_list(values["ignore"]) if get("ignore") else ()
        key = admin.parse_column_list(values["key"]) if get("key") else None
        schedule = None
        if get("cron") or get("every"):
            if method != "snapshot":
                raise PgHeraldError("a schedule is for snapshot watches: choose method snapshot")
            schedule = Schedule.parse(get("cron"), get("every"))
        added = admin.add_watch(
            ctx.settings,
            table,
            columns=columns,
            ignore_columns=ignore,
            key=key,
            name=get("name"),
            method=method,
            schedule=schedule,
        )
    except PgHeraldError as e:
        return ctx.render(
            "watch_new.html",
            status=400,
            error=str(e),
            form=values,
            methods=METHOD_CHOICES,
            tables=_tables(ctx),
            active="new",
        )
    return ctx.render("watch_added.html", added=added, active="new")


# -- subscriptions and deliveries ------------------------------------------------------------


def describe_filter(filter: dict[str, Any], ignore: Sequence[str] = ()) -> str:
    """A subscription's filter in words: ``insert, update; when id > 1; ...``."""
    parts = []
    if filter.get("ops"):
        parts.append(", ".join(map(str, filter["ops"])))
    if filter.get("columns"):
        parts.append("when " + ", ".join(map(str, filter["columns"])) + " change")
    if filter.get("where"):
        parts.append(f"where {filter['where']}")
    if ignore:
        parts.append("ignoring " + ", ".join(ignore))
    return "; ".join(parts) or "everything"


def _subscriptions_page(ctx: Ctx, error: str | None, status: int) -> Response:
    return ctx.render(
        "subscriptions.html",
        describe=describe_filter,
        status=status,
        error=error,
        subscriptions=deliveries.list_subscriptions(ctx.conn, ctx.schema),
        sinks=deliveries.list_sinks(ctx.conn, ctx.schema),
        watches=registry.list_watches(ctx.conn, ctx.schema),
        operations=("insert", "update", "delete", "truncate"),
        active="subscriptions",
    )


def _owner_may_read(ctx: Ctx, sink: str, watch: str) -> None:
    """A user's own sink (self-service) gets only the watches its owner may read."""
    _, owner = own.owner_of(ctx.conn, ctx.schema, sink)
    found = users.get_user(ctx.conn, ctx.schema, owner) if owner is not None else None
    if found is not None and not selfservice.may_read(found, watch):
        raise PgHeraldError(f"sink {sink!r} belongs to {owner!r}, who may not read watch {watch!r}")


@page("editor")
def subscriptions(ctx: Ctx) -> Response:
    return _subscriptions_page(ctx, None, 200)


@page("editor")
def subscribe(ctx: Ctx) -> Response:
    assert ctx.form is not None
    sink, watch = ctx.param("sink"), ctx.param("watch")
    ops = [o for o in ctx.form.getlist("ops") if isinstance(o, str)]
    try:
        if sink is None or watch is None:
            raise PgHeraldError("choose a sink and a watch")
        _owner_may_read(ctx, sink, watch)
        routing_admin.subscribe(
            ctx.settings,
            sink,
            [watch],
            ops=ops or None,
            columns=admin.parse_column_list(c) if (c := ctx.param("columns")) else None,
            where=ctx.param("where"),
            ignore_columns=admin.parse_column_list(i) if (i := ctx.param("ignore")) else (),
        )
    except PgHeraldError as e:
        return _subscriptions_page(ctx, str(e), 400)
    return redirect("/subscriptions")


@page("editor")
def unsubscribe(ctx: Ctx) -> Response:
    sink, watch = ctx.param("sink"), ctx.param("watch")
    try:
        if sink is None or watch is None:
            raise PgHeraldError("choose a subscription to remove")
        routing_admin.unsubscribe(ctx.settings, sink, [watch])
    except PgHeraldError as e:
        return _subscriptions_page(ctx, str(e), 400)
    return redirect("/subscriptions")


@page("editor")
def deliveries_page(ctx: Ctx) -> Response:
    sink, status = ctx.param("sink"), ctx.param("status")
    if status is not None and status not in DELIVERY_STATUSES:
        status = None
    try:
        before = _before(ctx)
    except BadFilter as e:
        return ctx.render("error.html", status=400, title="Bad request", message=str(e))
    rows, older = browse.deliveries(
        ctx.conn, ctx.schema, before or browse.NEWEST, sink, status, PAGE_SIZE
    )
    counts = deliveries.counts(ctx.conn, ctx.schema)
    params = {"sink": sink or "", "status": status or ""}
    return ctx.render(
        "deliveries.html",
        rows=rows,
        counts=counts,
        sinks=deliveries.list_sinks(ctx.conn, ctx.schema),
        statuses=DELIVERY_STATUSES,
        sink=sink,
        status_filter=status,
        older=("/deliveries?" + urllib.parse.urlencode({**params, "before": older}))
        if older
        else None,
        fmt=_fmt(ctx),
        active="deliveries",
    )


# -- users -----------------------------------------------------------------------------------


def _users_page(ctx: Ctx, error: str | None = None, status: int = 200) -> Response:
    return ctx.render(
        "users.html",
        status=status,
        error=error,
        users=users.list_users(ctx.conn, ctx.schema),
        watches=registry.list_watches(ctx.conn, ctx.schema),
        roles=users.ROLES,
        fmt=_fmt(ctx, "never"),
        active="users",
    )


@page("admin")
def users_page(ctx: Ctx) -> Response:
    return _users_page(ctx)


def _watch_list(ctx: Ctx) -> Sequence[str]:
    assert ctx.form is not None
    return [w for w in ctx.form.getlist("watches") if isinstance(w, str) and w]


def _password(ctx: Ctx) -> str:
    """The password field as typed: spaces count, so it is not stripped like the others."""
    value = ctx.form.get("password") if ctx.form is not None else None
    return value if isinstance(value, str) else ""


@page("admin")
def user_add(ctx: Ctx) -> Response:
    try:
        accounts.add_user(
            ctx.settings,
            ctx.param("name") or "",
            _password(ctx),
            ctx.param("role") or "viewer",
            _watch_list(ctx),
        )
    except PgHeraldError as e:
        return _users_page(ctx, str(e), 400)
    return redirect("/users")


@page("admin")
def user_update(ctx: Ctx) -> Response:
    name = ctx.param("name") or ""
    try:
        if users.get_user(ctx.conn, ctx.schema, name) is None:
            raise PgHeraldError(f"there is no user named {name!r}")
        action = ctx.param("action")
        if action == "remove":
            accounts.remove_user(ctx.settings, name)
        elif action == "save":
            accounts.set_role(ctx.settings, name, ctx.param("role") or "")
            accounts.set_watches(ctx.settings, name, _watch_list(ctx))
        elif action == "password":
            accounts.set_password(ctx.settings, name, _password(ctx))
        else:
            raise PgHeraldError("unknown action")
    except PgHeraldError as e:
        return _users_page(ctx, str(e), 400)
    return redirect("/users")


__all__ = [
    "changes",
    "dashboard",
    "deliveries_page",
    "event_detail",
    "history",
    "subscribe",
    "subscriptions",
    "unsubscribe",
    "user_add",
    "user_update",
    "users_page",
    "watch_add",
    "watch_detail",
    "watch_form",
]
