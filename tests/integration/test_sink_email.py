"""The e-mail sink against a real SMTP server run by the test (aiosmtpd, STARTTLS or TLS with a
self-signed certificate made here, AUTH): the parsed mails (headers, both parts, rendered
fields, hostile values), what the server's answers become, outages, and the options."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events import ChangeEvent
from pgherald.sinks.base import Message, Outcome, SinkConfig
from pgherald.sinks.digest import Digest, RunInfo
from pgherald.sinks.email import EmailSink, SmtpSettings, from_config
from tests.integration.sink_events import change, messages
from tests.integration.smtp_server import PASSWORD, USER, Cert, MailServer, Silent, make_cert, parts

TO = ["finance@example.com", "Audit Team <audit@example.com>"]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("smtp-cert"))


@pytest.fixture
def server(cert: Cert) -> Iterator[MailServer]:
    s = MailServer(cert, "starttls").start()
    try:
        yield s
    finally:
        s.stop()


def options(server_port: int, cert: Cert, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server_port,
        "starttls": True,
        "ca_file": str(cert.cert),
        "username": USER,
        "password": PASSWORD,
        "from": "pgherald <herald@example.org>",
        "to": ", ".join(TO),
        "helo": "pgherald.test",
        "timeout": 5,
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def make_sink(port: int, cert: Cert, **extra: Any) -> EmailSink:
    return from_config(SinkConfig("mail", "email", options=options(port, cert, **extra)))


def send(sink: EmailSink, batch: Sequence[Message]) -> list[Outcome]:
    return asyncio.run(sink.send(batch))


def test_a_mail_per_change_over_starttls_with_auth(server: MailServer, cert: Cert) -> None:
    sink = make_sink(server.port, cert)
    events = [change(1), change(2, op="update"), change(3, op="delete", row=7)]
    assert send(sink, messages(events)) == [None, None, None]

    assert [(r.tls, r.authenticated) for r in server.received] == [(True, True)] * 3
    assert server.logins == [(USER, PASSWORD)], "one connection, one login for the batch"
    first = server.received[0]
    assert first.mail_from == "herald@example.org"
    assert first.rcpt_tos == ("finance@example.com", "audit@example.com")

    added, changed, deleted = server.messages()
    assert added["From"] == "pgherald <herald@example.org>"
    assert added["To"] == "finance@example.com, Audit Team <audit@example.com>"
    assert added["Subject"] == "[pgherald] orders: ID 1 added"
    assert changed["Subject"] == "[pgherald] orders: ID 1 changed"
    assert deleted["Subject"] == "[pgherald] orders: ID 7 deleted"
    assert added["Auto-Submitted"] == "auto-generated"
    assert added["X-Pgherald-Event-Id"] == events[0].event_id
    assert added["X-Pgherald-Watch"] == "orders"
    assert added["X-Pgherald-Operation"] == "insert"
    assert added["X-Pgherald-Table"] == "public.orders"
    assert added["X-Pgherald-Sink"] == "mail"
    assert added["Date"] is not None
    assert str(added["Message-ID"]).endswith("@example.org>")
    assert len({m["Message-ID"] for m in (added, changed, deleted)}) == 3

    text, html = parts(added)
    assert "orders: ID 1 added" in text
    assert "May 1, 2024, 12:00:01\u202fPM UTC · logical replication" in text
    assert "  Name: Zoë 1" in text and "  Amount: 1.50" in text
    text, html = parts(changed)
    assert "  Name: Zoë 1 → Zoë 2" in text
    assert "  Amount: 0.00 → 2.50" in text
    assert '<span class="pgh-old"><bdi>Zoë 1</bdi></span>' in html
    assert '<span class="pgh-new"><bdi>Zoë 2</bdi></span>' in html
    assert "<title>[pgherald] orders: ID 1 changed</title>" in html
    text, html = parts(deleted)
    assert "orders: ID 7 deleted" in text and "  Name: Zoë 2" in text

    # The same change sent again (a retry after a crash) is the same message to mail programs.
    assert send(sink, messages(events[:1])) == [None]
    assert server.messages()[-1]["Message-ID"] == added["Message-ID"]


def test_hostile_values_are_shown_escaped_and_cannot_add_headers(
    server: MailServer, cert: Cert
) -> None:
    hostile = '<script>alert("x")</script>\r\nBcc: victim@example.com'
    rtl = "שלום עולם ‮evil"
    event = change(1, name=hostile, watch="orders\r\nX-Injected: yes")
    long_event = change(2, name="x" * 5000)
    rtl_event = change(3, name=rtl)
    sink = make_sink(server.port, cert, subject="{watch} / {key} / {op} / {table}")
    assert send(sink, messages([event, long_event, rtl_event])) == [None, None, None]
    mail, long_mail, rtl_mail = server.messages()

    assert mail["X-Injected"] is None and mail["Bcc"] is None
    assert mail["Subject"] == "orders↵ X-Injected: yes / ID 1 / added / public.orders"
    assert mail["X-Pgherald-Watch"] == "orders X-Injected: yes"
    assert all(r.rcpt_tos == ("finance@example.com", "audit@example.com") for r in server.received)
    text, html = parts(mail)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert '  Name: <script>alert("x")</script>↵ Bcc: victim@example.com 1' in text
    assert "orders↵ X-Injected: yes: ID 1 added" in text

    # A long value is shortened where it is listed, and given in full below.
    text, html = parts(long_mail)
    assert "  Name: " + "x" * 150 in text and "x…\r\n" in text
    assert "Name, in full:" in text and "x" * 5000 in text
    assert "x…</bdi></summary>" in html and "x" * 5000 in html

    # Right-to-left text arrives intact; a bidi override cannot reorder what follows it.
    text, html = parts(rtl_mail)
    assert "  Name: \u2068שלום עולם \u202eevil 3\u2069" in text
    assert "<bdi>שלום עולם \u202eevil 3</bdi>" in html


def test_tls_from_the_start(cert: Cert) -> None:
    server = MailServer(cert, "ssl").start()
    try:
        sink = make_sink(server.port, cert, starttls=False, ssl=True)
        assert send(sink, messages([change(1)])) == [None]
        assert [(r.tls, r.authenticated) for r in server.received] == [(True, True)]
    finally:
        server.stop()


def test_an_untrusted_certificate_is_permanent(server: MailServer, cert: Cert) -> None:
    sink = make_sink(server.port, cert, ca_file=None)
    (outcome,) = send(sink, messages([change(1)]))
    assert isinstance(outcome, PermanentSinkError)
    assert "certificate is not trusted" in str(outcome) and "ca_file" in str(outcome)
    assert server.received == []
    # verify = false trusts any certificate (for relays inside a trusted network)
    trusting = make_sink(server.port, cert, ca_file=None, verify=False)
    assert send(trusting, messages([change(1)])) == [None]


@pytest.mark.parametrize(
    ("where", "reply", "kind"),
    [
        ("rcpt", "550 5.1.1 no such user", PermanentSinkError),
        ("rcpt", "553 5.7.1 relaying denied", PermanentSinkError),
        ("rcpt", "450 4.2.1 mailbox busy, try later", RetryableSinkError),
        ("data", "554 5.7.1 message refused by policy", PermanentSinkError),
        ("data", "452 4.3.1 insufficient storage", RetryableSinkError),
    ],
)
def test_the_servers_answer_decides_retry_or_dead_letter(
    server: MailServer, cert: Cert, where: str, reply: str, kind: type[Exception]
) -> None:
    """The second mail of three is refused; the others go through."""
    if where == "rcpt":
        calls = iter(range(100))
        # Two recipients per mail: the second mail's RCPTs are calls 2 and 3.
        server.rcpt_reply = lambda address: reply if next(calls) in (2, 3) else None
    else:
        server.data_reply = lambda text: reply if change(2).event_id in text else None
    outcomes = send(make_sink(server.port, cert), messages([change(1), change(2), change(3)]))
    assert outcomes[0] is None and outcomes[2] is None
    assert type(outcomes[1]) is kind
    assert reply.split()[0] in str(outcomes[1]) and "127.0.0.1" in str(outcomes[1])
    assert [m["X-Pgherald-Event-Id"] for m in server.messages()] == [
        change(1).event_id,
        change(3).event_id,
    ]


def test_service_closing_stops_the_batch(server: MailServer, cert: Cert) -> None:
    server.data_reply = lambda text: "421 4.3.2 closing" if change(2).event_id in text else None
    outcomes = send(make_sink(server.port, cert), messages([change(1), change(2), change(3)]))
    assert outcomes[0] is None
    assert isinstance(outcomes[1], RetryableSinkError) and "421" in str(outcomes[1])
    assert isinstance(outcomes[2], RetryableSinkError)
    assert str(outcomes[2]).startswith("not sent: ")
    assert len(server.received) == 1


def test_a_mail_accepted_for_some_recipients_is_delivered(
    server: MailServer, cert: Cert, caplog: pytest.LogCaptureFixture
) -> None:
    server.rcpt_reply = lambda a: "550 5.1.1 unknown" if a == "audit@example.com" else None
    with caplog.at_level(logging.WARNING, "pgherald.sinks.email"):
        assert send(make_sink(server.port, cert), messages([change(1)])) == [None]
    assert server.received[0].rcpt_tos == ("finance@example.com",)
    assert "refused audit@example.com (550 5.1.1 unknown)" in caplog.text


def test_all_recipients_refused_for_now_is_retryable(server: MailServer, cert: Cert) -> None:
    server.rcpt_reply = lambda a: "451 4.7.1 greylisted, come back later"
    (outcome,) = send(make_sink(server.port, cert), messages([change(1)]))
    assert isinstance(outcome, RetryableSinkError) and "greylisted" in str(outcome)


def test_a_wrong_password_is_permanent_and_the_password_is_never_shown(
    server: MailServer, cert: Cert, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wrong-Pa55-word-XYZ"
    sink = make_sink(server.port, cert, password=secret)
    with caplog.at_level(logging.DEBUG):
        outcomes = send(sink, messages([change(1), change(2)]))
    assert all(isinstance(o, PermanentSinkError) for o in outcomes)
    assert "535" in str(outcomes[0]) and "check username and password" in str(outcomes[0])
    shown = " ".join(str(o) for o in outcomes) + caplog.text + repr(sink) + repr(sink.smtp)
    assert secret not in shown
    assert server.logins and all(login == (USER, secret) for login in server.logins)
    assert server.received == []


def test_a_server_that_is_down_or_silent_costs_one_try_per_batch(cert: Cert) -> None:
    port = Silent.start()
    try:
        sink = make_sink(port.port, cert, timeout=0.5)
        started = time.monotonic()
        outcomes = send(sink, messages([change(1), change(2), change(3)]))
        assert time.monotonic() - started < 3
    finally:
        port.stop()
    assert all(isinstance(o, RetryableSinkError) for o in outcomes)
    assert "no answer in time" in str(outcomes[0])

    closed = Silent.start()
    closed.stop()  # nothing listens there now
    outcomes = send(make_sink(closed.port, cert), messages([change(1), change(2)]))
    assert all(isinstance(o, RetryableSinkError) for o in outcomes)
    assert "127.0.0.1" in str(outcomes[0])


def _digest(events: list[ChangeEvent], **kw: Any) -> Digest:
    counts: dict[tuple[str, str], int] = {}
    for e in events:
        counts[(e.watch, e.op)] = counts.get((e.watch, e.op), 0) + 1
    base: dict[str, Any] = {
        "sink": "mail",
        "period": "day",
        "key": "day:2024-05-01",
        "start": datetime(2024, 5, 1, tzinfo=UTC),
        "end": datetime(2024, 5, 2, tzinfo=UTC),
        "total": len(events),
        "counts": counts,
        "events": [(e.seq, e) for e in events],
        "timezone": UTC,
    }
    base.update(kw)
    return Digest(**base)


def test_a_digest_mail(server: MailServer, cert: Cert) -> None:
    sink = make_sink(server.port, cert, mode="digest", period="day", max_items=2)
    events = [change(1), change(2, op="update"), change(3, op="delete", row=2, table="<b>x</b>")]
    digest = _digest(events[:2], total=3, counts={("orders", "insert"): 1,
                     ("orders", "update"): 1, ("<b>x</b>", "delete"): 1})  # fmt: skip
    assert asyncio.run(sink.send_digest(digest)) is None
    (mail,) = server.messages()
    assert mail["Subject"] == "[pgherald] <b>x</b>, orders: 3 changes (2024-05-01 (UTC))"
    assert mail["X-Pgherald-Digest"] == "day:2024-05-01"
    assert mail["X-Pgherald-Changes"] == "3"
    text, html = parts(mail)
    assert "3 changes: 1 added, 1 changed, 1 deleted" in text
    assert "orders: ID 1 added" in text and "  Name: Zoë 1 → Zoë 2" in text
    assert "… and 1 more change not listed here." in text
    assert '<td><bdi>&lt;b&gt;x&lt;/b&gt;</bdi></td><td>deleted</td><td class="n">1</td>' in html
    assert "<b>x</b>" not in html
    assert "… and 1 more change\r\nnot listed here.</p>" in html
    # Sent again (after a crash), the digest is the same message.
    assert asyncio.run(sink.send_digest(digest)) is None
    assert server.messages()[1]["Message-ID"] == mail["Message-ID"]

    empty = _digest([], key="run:9", period="run", start=None, end=None, watches=("orders",),
                    run=RunInfo(9, "orders", "ok", datetime(2024, 5, 1, 3, tzinfo=UTC),
                                datetime(2024, 5, 1, 3, 5, tzinfo=UTC)))  # fmt: skip
    assert asyncio.run(sink.send_digest(empty)) is None
    mail = server.messages()[-1]
    assert mail["Subject"] == "[pgherald] orders: no changes (run 9 of orders)"
    text, html = parts(mail)
    assert "Nothing changed." in text and '<p class="pgh-summary">Nothing changed.</p>' in html
    assert "Snapshot run 9 of orders, started May 1, 2024, 3:00:00\u202fAM UTC" in text


def test_a_digest_sink_refuses_single_changes_from_the_engine(cert: Cert) -> None:
    sink = make_sink(1, cert, mode="digest")
    (outcome,) = send(sink, messages([change(1)]))
    assert isinstance(outcome, RetryableSinkError) and "digest job" in str(outcome)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"host": None}, "option 'host' is required"),
        ({"to": None}, "option 'to' is required"),
        ({"to": []}, "option 'to' is required"),
        ({"to": ["ok@example.com", 5]}, "must be a list of addresses"),
        ({"to": "nobody"}, "'nobody' is not an e-mail address"),
        ({"to": "a@example.com\r\nBcc: x@example.com"}, "is not one line"),
        ({"from": "Zoë <zoë@example.com>"}, "is not an e-mail address"),
        ({"color": "blue"}, "unknown option(s) 'color'"),
        ({"ssl": True}, "'ssl' (TLS from the start) and 'starttls' exclude each other"),
        ({"starttls": False}, "a password would travel in clear text"),
        ({"password": None}, "'username' and 'password' go together"),
        ({"port": 70000}, "'port' must be at most 65535"),
        ({"starttls": "maybe"}, "'starttls' must be true or false"),
        ({"subject": "{watch.__class__}"}, "field {watch.__class__} is not allowed"),
        ({"subject": "{count}"}, "field {count} is not allowed"),
        ({"subject": "{watch!r}"}, "is not allowed"),
        ({"subject": "{"}, "is malformed"),
        ({"mode": "weekly"}, "'mode' must be 'change' or 'digest'"),
        ({"period": "day"}, "'period' are for mode = 'digest'"),
        ({"mode": "digest", "period": "week"}, "'period' must be one of hour, day, run"),
        ({"mode": "digest", "subject": "{key}"}, "field {key} is not allowed"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"locale": "xx_YY"}, "unknown locale 'xx_YY'"),
        ({"timeout": 0}, "'timeout' must be at least"),
    ],
)
def test_options_are_checked(cert: Cert, extra: dict[str, Any], error: str) -> None:
    config = SinkConfig("mail", "email", options=options(25, cert, **extra))
    if extra.get("to") == []:
        config = SinkConfig("mail", "email", options={**config.options, "to": []})
    with pytest.raises(ConfigError) as raised:
        from_config(config)
    assert error in str(raised.value)
    assert str(raised.value).startswith("sink 'mail' (email): ")
    assert PASSWORD not in str(raised.value)


def _server(sink: EmailSink) -> SmtpSettings:
    assert sink.smtp is not None  # a sink with its own server (not smtp = "settings")
    return sink.smtp


def test_defaults_and_lists(cert: Cert) -> None:
    sink = from_config(
        SinkConfig(
            "mail",
            "email",
            options={"host": "mx.example.com", "from": "a@example.com", "to": ["b@example.com"]},
        )
    )
    assert (_server(sink).port, _server(sink).starttls, _server(sink).ssl, sink.digest) == (
        25,
        False,
        False,
        None,
    )
    assert sink.recipients == ["b@example.com"]
    ssl_options = options(1, cert, starttls=False, ssl=True)
    del ssl_options["port"]
    assert _server(from_config(SinkConfig("mail", "email", options=ssl_options))).port == 465
    tls_options = options(1, cert)
    del tls_options["port"]
    assert _server(from_config(SinkConfig("mail", "email", options=tls_options))).port == 587
    digest = make_sink(1, cert, mode="digest", send_empty="yes", timezone="Europe/Berlin").digest
    assert digest is not None
    assert (digest.period, digest.send_empty, digest.delay, digest.max_items) == (
        "day",
        True,
        60,
        200,
    )
    assert str(digest.timezone) == "Europe/Berlin"


def test_a_sink_may_use_the_mail_server_of_the_settings() -> None:
    """``smtp = "settings"``: the server (and its password) come from ``[smtp]`` when the
    sink is wired (``use_settings``), never from the sink's stored options."""
    sink = from_config(
        SinkConfig("mine", "email", options={"smtp": "settings", "to": "vi@example.com"})
    )
    assert sink.shared_smtp and sink.smtp is None
    sink.use_settings(
        smtp={"host": "mx.example.com", "port": 2525, "from": "Herald <h@example.org>"}
    )
    assert (_server(sink).host, _server(sink).port, sink.sender) == (
        "mx.example.com",
        2525,
        "Herald <h@example.org>",
    )
    for options, message in [
        ({"smtp": "other", "to": "a@example.com"}, "can only be 'settings'"),
        ({"smtp": "settings", "host": "x", "to": "a@example.com"}, "choose one"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_config(SinkConfig("mine", "email", options=options))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"port": 25, "from": "a@example.com"}, "key 'host' is required"),
        ({"host": "x"}, "key 'from' is required"),
        ({"host": "x", "from": "a@example.com", "nope": 1}, "unknown key"),
        ({"host": "x", "from": "a@example.com", "username": "u", "password": PASSWORD},
         "clear text"),
    ]  # fmt: skip
    for table, message in cases:
        fresh = from_config(
            SinkConfig("mine", "email", options={"smtp": "settings", "to": "a@example.com"})
        )
        with pytest.raises(ConfigError, match=message) as raised:
            fresh.use_settings(smtp=table)
        assert str(raised.value).startswith("[smtp] in the configuration: ")
        assert PASSWORD not in str(raised.value)


def test_without_a_mail_server_of_the_settings_the_mails_fail_permanently() -> None:
    sink = from_config(
        SinkConfig("mine", "email", options={"smtp": "settings", "to": "vi@example.com"})
    )
    sink.use_settings()  # no [smtp] where this process runs
    (outcome,) = asyncio.run(sink.send(messages([change(1)])))
    assert isinstance(outcome, PermanentSinkError) and "[smtp]" in str(outcome)
