"""``pgherald.logs``: secrets masked whatever code logs them, JSON lines, context fields;
and the daemon's settings (``log_format``, ``shutdown_timeout``)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgherald import logs
from pgherald.config import Settings, SinkSpec, load_settings
from pgherald.daemon import Roles, secrets_of
from pgherald.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("connecting to postgresql://herald:S3cr3t-x@db:5432/app?sslmode=require", "S3cr3t-x"),
        ("amqp://guest:pa@ss-word@127.0.0.1:5672/ refused", "pa@ss-word"),
        ("redis://:only-a-password@cache:6379/0", "only-a-password"),
        ("host=db password=abc123xyz user=x", "abc123xyz"),
        ("host=db password = 'a b\\'c-1234' user=x", "a b\\'c-1234"),
        ("host=db sslpassword=keypass-77", "keypass-77"),
        ("options {'url': 'http://x', 'password': 'hunter22'}", "hunter22"),
        ('{"smtp_password": "xyz98765", "user": "me"}', "xyz98765"),
        ("{'headers': {'Authorization': 'Bearer tok-123456'}}", "tok-123456"),
        ('{"X-Api-Key": "k-abcdef"}', "k-abcdef"),
        ("GET /feeds/x.atom?token=abcdef123&page=2", "abcdef123"),
        ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
        ("secret=s-77777, next", "s-77777"),
    ],
)
def test_patterns_mask_passwords_and_secrets(text: str, secret: str) -> None:
    masked = logs.redact(text)
    assert secret not in masked
    assert logs.MASK in masked


@pytest.mark.parametrize(
    "text",
    [
        "inserted 5 rows into public.employees, author=ann",
        "capturing from slot pgherald at 0/16B3748",
        "host=db user=herald dbname=app",
        "dsn host=db password=*** user=x",
        "postgresql://u:***@h/db",
        "https://example.com/hook",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert logs.redact(text) == text


def test_known_secrets_are_masked_anywhere() -> None:
    logs.add_secrets({"Known-Secret-9911", "abc"})  # too short to mask by value
    assert logs.redact("the server said Known-Secret-9911 is wrong") == (
        "the server said *** is wrong"
    )
    assert logs.redact("abc") == "abc"


def test_secrets_found_in_settings() -> None:
    settings = Settings(
        dsn="host=db user=u password=Dsn-Pass-1",
        sinks=(
            _sink("bus", {"url": "amqp://u:Amqp-Pass-2@mq/"}),
            _sink("hook", {"url": "https://h/x", "headers": {"Authorization": "Bearer Tok-3333"}}),
            _sink("mail", {"host": "smtp", "password": "Smtp-Pass-4", "username": "me"}),
        ),
        smtp={"host": "mail.example.com", "username": "herald", "password": "Smtp-Pass-6"},
    )
    found = secrets_of(settings)
    for value in ("Dsn-Pass-1", "Amqp-Pass-2", "Bearer Tok-3333", "Tok-3333", "Smtp-Pass-4",
                  "Smtp-Pass-6"):  # fmt: skip
        assert value in found
    assert "me" not in found and "https://h/x" not in found
    assert logs.secrets_in_dsn("postgresql://u:Uri-Pass-5@h/d") == {"Uri-Pass-5"}
    assert logs.secrets_in_dsn("host=x password=abc secretpart") == set()  # unparsable


def _sink(name: str, options: dict[str, object]) -> SinkSpec:
    return SinkSpec(name=name, kind="webhook", options=options)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    for h in list(root.handlers):
        root.removeHandler(h)
    logs.setup("debug", "json", stream=stream)
    yield stream
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[1]:
        root.addHandler(h)
    root.setLevel(saved[0])


def test_json_lines_with_context_and_masked_tracebacks(captured: io.StringIO) -> None:
    log = logging.getLogger("pgherald.test")
    log.info("connected to %s", "postgresql://u:Pw-123456@h/d", extra={"slot": "s1"})
    with logs.bound(sink="hook"):
        log.warning("sink %s failed", "hook")
    try:
        raise RuntimeError("password=Boom-98765 refused")
    except RuntimeError:
        log.exception("it broke")
    records = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [r["level"] for r in records] == ["info", "warning", "error"]
    first, second, third = records
    assert first["message"] == "connected to postgresql://u:***@h/d"
    assert first["logger"] == "pgherald.test" and first["slot"] == "s1"
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["sink"] == "hook" and "sink" not in first
    assert "RuntimeError" in third["error"] and "Boom-98765" not in third["error"]
    assert "Pw-123456" not in captured.getvalue()


def test_text_format_and_reconfiguring_in_place(captured: io.StringIO) -> None:
    logs.setup("info", "text", stream=captured)
    root = logging.getLogger()
    assert len([h for h in root.handlers if isinstance(h, logs._Handler)]) == 1
    log = logging.getLogger("pgherald")
    log.debug("not shown")
    log.info("stored %d events", 5, extra={"watch": "orders"})
    logging.getLogger("httpx").info("HTTP Request: POST ...")  # a noisy library, below warning
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("INFO pgherald: stored 5 events watch=orders")


def test_every_handler_gets_the_filter(captured: io.StringIO) -> None:
    other = io.StringIO()
    handler = logging.StreamHandler(other)
    lib = logging.getLogger("some.library")
    lib.addHandler(handler)
    lib.propagate = False
    try:
        logs.protect_handlers()
        lib.error("login with password=Lib-Secret-1 failed")
        assert "Lib-Secret-1" not in other.getvalue() and "password=***" in other.getvalue()
    finally:
        lib.removeHandler(handler)
        lib.propagate = True


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30.0), ("2m", 120.0), ("1m30s", 90.0), ("45", 45.0), (10, 10.0), (2.5, 2.5),
     ("500ms", 0.5), ("1h", 3600.0)],
)  # fmt: skip
def test_shutdown_timeout(tmp_path: Path, value: object, seconds: float) -> None:
    config = tmp_path / "p.toml"
    config.write_text(f"shutdown_timeout = {json.dumps(value)}\n")
    assert load_settings(config, env={}).shutdown_timeout == seconds


@pytest.mark.parametrize("value", ['"soon"', '"0s"', "0", '"2h"', "true", '"30 s x"'])
def test_bad_shutdown_timeout(tmp_path: Path, value: str) -> None:
    config = tmp_path / "p.toml"
    config.write_text(f"shutdown_timeout = {value}\n")
    with pytest.raises(ConfigError, match="shutdown_timeout"):
        load_settings(config, env={})


def test_log_format(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text('log_format = "JSON"\n')
    assert load_settings(config, env={}).log_format == "json"
    assert load_settings(env={"PGHERALD_LOG_FORMAT": "text"}).log_format == "text"
    with pytest.raises(ConfigError, match="PGHERALD_LOG_FORMAT must be one of text, json"):
        load_settings(env={"PGHERALD_LOG_FORMAT": "xml"})


def test_roles() -> None:
    assert Roles().describe() == "capture, snapshots, delivery"
    assert Roles(capture=False, snapshots=False, web=("h", 1)).describe() == (
        "delivery, web console"
    )
    with pytest.raises(ConfigError, match="nothing to run"):
        Roles(capture=False, snapshots=False, delivery=False).check()
