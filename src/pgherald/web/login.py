"""Signing in and out.

The login form has no session yet, so its CSRF token is a double submit: a random token
in the form and the same token, signed, in a short-lived cookie. A failed login says
only that the name or the password is wrong, after the same work either way.
"""

from __future__ import annotations

import logging
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from pgherald.errors import ConnectionFailed, SchemaError
from pgherald.store import users as user_store
from pgherald.web import accounts
from pgherald.web.console import Console, unavailable
from pgherald.web.security import LOGIN_COOKIE, SESSION_COOKIE, same_token

log = logging.getLogger("pgherald.web")
MAX_FIELD: Final = 1024


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this console only, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 32 for c in target):
        return "/"
    return target


def _form(
    console: Console, request: Request, error: str | None, status: int, name: str
) -> Response:
    token, cookie = console.signer.login_token()
    response = console.render(
        request,
        "login.html",
        None,
        status=status,
        error=error,
        login_token=token,
        name=name,
        next=safe_next(request.query_params.get("next")),
        title="Sign in",
    )
    response.set_cookie(
        LOGIN_COOKIE,
        cookie,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=console.secure(request),
        path="/login",
    )
    return response


async def login(request: Request) -> Response:
    console: Console = request.app.state.console
    if request.method == "GET":
        return _form(console, request, None, 200, "")
    form = await request.form(max_files=0, max_fields=20)
    name, password, token = (form.get(k) for k in ("name", "password", "csrf"))
    if not all(isinstance(v, str) and len(v) <= MAX_FIELD for v in (name, password, token)):
        return _form(console, request, "Enter your name and password.", 400, "")
    assert isinstance(name, str) and isinstance(password, str) and isinstance(token, str)
    if not console.signer.check_login_token(request.cookies.get(LOGIN_COOKIE), token):
        return _form(console, request, "The form expired; please sign in again.", 403, name)
    try:
        user = await run_in_threadpool(_check, console, name, password)
    except (ConnectionFailed, SchemaError) as e:
        return unavailable(console, request, e)
    if user is None:
        log.info("failed sign-in for %r from %s", name[:100], request.client)
        return _form(console, request, "Wrong name or password.", 401, name)
    value, _ = console.signer.session(user)
    wanted = form.get("next")
    target = safe_next(wanted if isinstance(wanted, str) else None)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=console.signer.max_age,
        httponly=True,
        samesite="lax",
        secure=console.secure(request),
        path="/",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


def _check(console: Console, name: str, password: str) -> user_store.User | None:
    schema = console.settings.schema
    with console.pool.connection() as conn:
        user = user_store.get_user(conn, schema, name)
        if not accounts.verify(user, password):
            return None
        assert user is not None
        if accounts.needs_rehash(user):
            user_store.set_password(
                conn, schema, name, accounts.rehash(password), end_sessions=False
            )
        user_store.record_login(conn, schema, name)
        return user


async def logout(request: Request) -> Response:
    console: Console = request.app.state.console
    form = await request.form(max_files=0, max_fields=20)
    session = console.signer.read_session(request.cookies.get(SESSION_COOKIE))
    token = form.get("csrf")
    if session is not None and not same_token(
        session.csrf, token if isinstance(token, str) else None
    ):
        return Response("This form is out of date: reload the page.", status_code=403)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
