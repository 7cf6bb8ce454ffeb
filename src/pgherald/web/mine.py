"""Self-service pages, for every signed-in user: "My subscriptions" (subscribe yourself to a
watch you may read by feed or e-mail, your feed's addresses, your e-mail address,
unsubscribe) and "My deliveries" (what was delivered to your own sinks).

Everything here is scoped to the signed-in user's own sinks (``pgherald.selfservice``,
``store.own``): someone else's sink, subscription or delivery is answered as one that does
not exist (404), whatever name or id is guessed. Forms carry the session's CSRF token
(``console.page`` checks it).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Final

from starlette.responses import RedirectResponse, Response

from pgherald import selfservice
from pgherald.selfservice import HOWS, NotYours, SelfServiceError
from pgherald.store import own
from pgherald.store import watches as registry
from pgherald.store.users import User
from pgherald.web.console import Ctx, not_found, page

PAGE_SIZE: Final = 50
STATUSES: Final = ("pending", "delivering", "delivered", "failed", "dead")
NOTICES: Final = {
    "subscribed": "Subscribed.",
    "unsubscribed": "Unsubscribed.",
    "email": "Your e-mail address is saved.",
    "rotated": "Your feed has new addresses: the old ones no longer work.",
}


@dataclass(frozen=True)
class MySubscription:
    sink: str
    watch: str
    how: str
    """In words: "a feed (Atom and RSS)", "e-mail, a daily digest"..."""


def _user(ctx: Ctx) -> User:
    return ctx.viewer.user


def _base_url(ctx: Ctx) -> str:
    return ctx.settings.public_url.rstrip("/") or str(ctx.request.base_url).rstrip("/")


def _mine_page(ctx: Ctx, error: str | None = None, status: int = 200) -> Response:
    user = _user(ctx)
    subs = [
        MySubscription(
            s.sink, s.watch, HOWS.get(selfservice.how_of(user.name, s.sink) or "", s.kind)
        )
        for s in own.subscriptions(ctx.conn, ctx.schema, user.name)
        if ctx.viewer.may_read(s.watch)
    ]
    watches = [
        w for w in registry.list_watches(ctx.conn, ctx.schema) if ctx.viewer.may_read(w.name)
    ]
    notice = NOTICES.get(ctx.request.query_params.get("done") or "")
    return ctx.render(
        "my.html",
        status=status,
        error=error,
        notice=notice,
        subscriptions=subs,
        watches=watches,
        hows=HOWS,
        mail_problem=selfservice.mail_problem(ctx.settings.smtp),
        email=user.email,
        feed=selfservice.feed_address(ctx.conn, ctx.schema, user, _base_url(ctx)),
        active="mine",
    )


def _done(what: str, anchor: str = "") -> Response:
    return RedirectResponse(f"/my?done={what}{anchor}", status_code=303)


@page()
def mine(ctx: Ctx) -> Response:
    return _mine_page(ctx)


@page()
def my_subscribe(ctx: Ctx) -> Response:
    watch, how = ctx.param("watch"), ctx.param("how")
    try:
        if watch is None or how is None:
            raise SelfServiceError("Choose a watch and how to get its changes.")
        selfservice.subscribe(ctx.conn, ctx.schema, _user(ctx), watch, how, ctx.settings.smtp)
    except NotYours as e:
        return _mine_page(ctx, str(e), 404)
    except SelfServiceError as e:
        return _mine_page(ctx, str(e), 400)
    return _done("subscribed", "#feed" if how == selfservice.FEED else "")


@page()
def my_unsubscribe(ctx: Ctx) -> Response:
    sink, watch = ctx.param("sink"), ctx.param("watch")
    try:
        if sink is None or watch is None:
            raise NotYours("There is no such subscription.")
        selfservice.unsubscribe(ctx.conn, ctx.schema, _user(ctx), sink, watch)
    except NotYours as e:
        return not_found(ctx, str(e))
    return _done("unsubscribed")


@page()
def my_email(ctx: Ctx) -> Response:
    try:
        selfservice.set_email(ctx.conn, ctx.schema, _user(ctx), ctx.param("email"))
    except SelfServiceError as e:
        return _mine_page(ctx, str(e), 400)
    return _done("email")


@page()
def my_feed_rotate(ctx: Ctx) -> Response:
    try:
        selfservice.rotate_feed_token(ctx.conn, ctx.schema, _user(ctx))
    except NotYours as e:
        return not_found(ctx, str(e))
    return _done("rotated", "#feed")


@page()
def my_deliveries(ctx: Ctx) -> Response:
    status = ctx.param("status")
    if status is not None and status not in STATUSES:
        status = None
    raw = ctx.param("before")
    before = int(raw) if raw is not None and raw.isdigit() and len(raw) <= 18 else own.NEWEST
    user = _user(ctx)
    rows, older = own.deliveries(
        ctx.conn, ctx.schema, user.name, ctx.viewer.watches, before, status, PAGE_SIZE
    )
    params = {"status": status or "", "before": str(older or "")}
    fmt = ctx.console.formatter().when
    return ctx.render(
        "my_deliveries.html",
        rows=rows,
        counts=own.delivery_counts(ctx.conn, ctx.schema, user.name),
        statuses=STATUSES,
        status_filter=status,
        how=lambda sink: HOWS.get(selfservice.how_of(user.name, sink) or "", sink),
        older=("/my/deliveries?" + urllib.parse.urlencode(params)) if older else None,
        fmt=lambda d: fmt(d) if d else "",
        active="mine",
    )


__all__ = ["mine", "my_deliveries", "my_email", "my_feed_rotate", "my_subscribe", "my_unsubscribe"]
