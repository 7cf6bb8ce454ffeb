"""The e-mail sink: a mail per change, or a digest per hour, day or snapshot run, over SMTP.

Built this way because:

- **People read these.** Every mail has a plain-text and an HTML part (``email_render``),
  says what changed in words, and carries ``Auto-Submitted: auto-generated`` so that
  vacation responders stay quiet. Header values made from data (the subject, the
  ``X-Pgherald-*`` headers) are one line, cut, with control characters removed: a
  hostile value cannot add a header.
- **Per change** (``mode = "change"``): ``send`` mails each message of a batch over one
  SMTP connection. The outcome follows the server's reply: 2xx delivered; 4xx, a lost or
  refused connection, a timeout retryable; 5xx (an unknown recipient, a refused sender, a
  policy rejection, failed authentication) permanent. When the server as a whole is
  unavailable (no connection, 421), the rest of the batch is not tried and shares that
  error, so a down server costs one timeout per batch, not per change. A mail accepted for
  some recipients counts as delivered (sending it again would duplicate it for the others);
  the refused ones are logged.
- **Digests** (``mode = "digest"``): the sink keeps nothing. Its deliveries wait in the
  store until the digest job (``pgherald.delivery.digests``) sends the digest of their
  period with ``send_digest`` and marks them delivered in the same transaction; see there
  for why a crash loses nothing and why a digest goes out once.
- **Secrets stay secret.** The password is used to log in and appears in no message,
  error, log line or ``repr``.
- **Stable message ids.** ``Message-ID`` is derived from the sink and the event id (or
  the digest's period), so a mail sent again after a crash is the same message to the
  recipients' mail programs, which may drop the copy.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr
from typing import Any, Final

import aiosmtplib

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError, SinkError
from pgherald.events import ChangeEvent
from pgherald.render import Display, Links, Renderer
from pgherald.render.values import check_locale, check_timezone
from pgherald.sinks.base import Message, Options, Outcome, SinkConfig
from pgherald.sinks.digest import PERIODS, Digest, DigestPolicy, Period
from pgherald.sinks.email_render import render_change, render_digest, window_text

log = logging.getLogger("pgherald.sinks.email")

DEFAULT_CHANGE_SUBJECT: Final = "[pgherald] {watch}: {key} {op}"
"""``{watch}`` is the watch's display name, ``{key}`` the row's label, ``{op}`` in words."""
DEFAULT_DIGEST_SUBJECT: Final = "[pgherald] {watches}: {changes} ({window})"
CHANGE_FIELDS: Final = frozenset({"sink", "watch", "table", "op", "operation", "key"})
DIGEST_FIELDS: Final = frozenset({"sink", "watches", "changes", "count", "period", "window"})
SUBJECT_LIMIT: Final = 200
_DETAIL_CHARS: Final = 200
_SERVER_WIDE_CODES: Final = frozenset({421})
_ADDR: Final = re.compile(r"^[^\s@<>()\[\]\\,;:\"]+@[A-Za-z0-9.\-]+$")


class _ServerWide(RetryableSinkError):
    """The server as a whole could not be used (not one mail's problem)."""


class SubjectTemplate:
    """``{name}`` fields filled from a fixed set; no attribute access, no format specs, so
    a template cannot reach into Python objects."""

    def __init__(self, template: str, fields: frozenset[str], where: str) -> None:
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as e:
            raise ConfigError(f"{where}: subject template {template!r} is malformed: {e}") from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in fields or spec or conversion:
                raise ConfigError(
                    f"{where}: subject template field {{{name}}} is not allowed; use some of"
                    f" {', '.join('{' + f + '}' for f in sorted(fields))}"
                )
        self.template = template
        self._parts = parsed

    def render(self, values: Mapping[str, str]) -> str:
        out = []
        for literal, name, _, _ in self._parts:
            out.append(literal)
            if name is not None:
                out.append(values[name])
        return header_text("".join(out), SUBJECT_LIMIT)


def header_text(value: str, limit: int = SUBJECT_LIMIT) -> str:
    """One header line: control characters (CR, LF among them) and runs of spaces become one
    space, long values are cut with "…"."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    starttls: bool = False
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0
    verify: bool = True
    ca_file: str | None = None
    helo: str | None = None

    def __repr__(self) -> str:  # the password never shows, not even in a debugger's repr
        return (
            f"SmtpSettings(host={self.host!r}, port={self.port}, starttls={self.starttls},"
            f" ssl={self.ssl}, username={self.username!r},"
            f" password={'***' if self.password else None})"
        )

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


class EmailSink:
    """Mails changes, one by one or as digests; see the module docstring for the why."""

    def __init__(
        self,
        name: str,
        smtp: SmtpSettings | None,
        sender: str | None,
        recipients: Sequence[str],
        *,
        subject: str | None = None,
        digest: DigestPolicy | None = None,
        locale: str | None = None,
        timezone: str | None = None,
        strictly_ordered: bool = False,
    ) -> None:
        self.name = name
        self.smtp = smtp
        """None: the mail server of the settings (``[smtp]``), given by ``use_settings``."""
        self.shared_smtp = smtp is None
        self.recipients = list(recipients)
        self.digest = digest
        self.strictly_ordered = strictly_ordered
        self._locale, self._timezone = locale, timezone
        """The sink's own choices; None: the store's settings (``use_settings``), else en/UTC."""
        self.renderer = Renderer(locale=locale or "en", timezone=timezone or "UTC")
        self._zone_name = timezone or "UTC"
        if digest is not None:
            self.digest = replace(digest, timezone=check_timezone(self._zone_name))
        where = f"sink {name!r} (email)"
        self.subject = SubjectTemplate(
            subject or (DEFAULT_DIGEST_SUBJECT if digest else DEFAULT_CHANGE_SUBJECT),
            DIGEST_FIELDS if digest else CHANGE_FIELDS,
            where,
        )
        self._envelope_to = [parseaddr(r)[1] for r in self.recipients]
        self._own_sender = sender
        self._set_sender(sender)

    def _set_sender(self, sender: str | None) -> None:
        self.sender = sender or ""
        self._envelope_from = parseaddr(self.sender)[1]
        self._domain = self._envelope_from.rpartition("@")[2] or "pgherald.invalid"

    def __repr__(self) -> str:
        return f"EmailSink({self.name!r}, {self.smtp!r})"

    @property
    def _target(self) -> str:
        return self.smtp.target if self.smtp is not None else "(no mail server)"

    def use_settings(
        self,
        *,
        locale: str = "en",
        timezone: str = "UTC",
        templates_dir: str | None = None,
        displays: Mapping[str, Display] | Callable[[str], Display] | None = None,
        links: Links | None = None,
        smtp: Mapping[str, Any] | None = None,
    ) -> None:
        """The store's settings for what the sink's options leave open: the locale and time
        zone of the mails (and where hours and days begin), the templates folder, the
        watches' display names and row labels, links to the web console (only when its
        public URL is known: a mail needs absolute links) and, for a sink with
        ``smtp = "settings"``, the mail server (the settings' ``[smtp]`` table; a malformed
        one is a ConfigError). The composition root calls this."""
        if self.shared_smtp and smtp:
            server, sender = shared_server(smtp)
            self.smtp = server
            self._set_sender(self._own_sender or sender)
        self._zone_name = self._timezone or timezone
        self.renderer = Renderer(
            locale=self._locale or locale,
            timezone=self._zone_name,
            templates_dir=templates_dir,
            displays=displays,
            links=links,
        )
        if self.digest is not None:
            self.digest = replace(self.digest, timezone=check_timezone(self._zone_name))

    async def start(self) -> None:
        """Nothing to do: each batch or digest connects, so a server that is down now is
        reported by ``send``, not here."""

    async def close(self) -> None:
        return None

    # -- per change ------------------------------------------------------------------------

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        if not batch:
            return []
        if self.digest is not None:
            error = RetryableSinkError(
                f"sink {self.name!r} sends digests: its deliveries are the digest job's"
                " (pgherald run / pgherald digests send), not the delivery engine's",
                retry_after=3600.0,
            )
            return [error] * len(batch)
        mails = [self.change_mail(m.event) for m in batch]
        return await self._send_all(mails)

    def change_mail(self, event: ChangeEvent) -> EmailMessage:
        """The mail of one change (its subject, headers and both parts)."""
        view = self.renderer.view(event)
        subject = self.subject.render(
            {
                "sink": self.name,
                "watch": view.watch_title,
                "table": f"{event.schema}.{event.table}" if event.schema else event.table,
                "op": view.op_words,
                "operation": event.op,
                "key": view.label or "",
            }
        )
        body = render_change(event, self.renderer, subject)
        mail = self._mail(subject, body.text, body.html, f"change.{self._id(event.event_id)}")
        mail["X-Pgherald-Event-Id"] = header_text(event.event_id)
        mail["X-Pgherald-Watch"] = header_text(event.watch)
        mail["X-Pgherald-Operation"] = event.op
        mail["X-Pgherald-Table"] = header_text(
            f"{event.schema}.{event.table}" if event.schema else event.table
        )
        return mail

    # -- digests ---------------------------------------------------------------------------

    async def send_digest(self, digest: Digest) -> Outcome:
        (outcome,) = await self._send_all([self.digest_mail(digest)])
        return outcome

    def digest_mail(self, digest: Digest) -> EmailMessage:
        names = sorted({w for w, _ in digest.counts} or set(digest.watches))
        watches = [self.renderer.display(w).title for w in names]
        shown = ", ".join(watches[:3]) + (
            f" and {len(watches) - 3} more" if len(watches) > 3 else ""
        )
        total = digest.total
        changes = "no changes" if total == 0 else f"{total} change{'s' if total != 1 else ''}"
        subject = self.subject.render(
            {
                "sink": self.name,
                "watches": shown or "(no watches)",
                "changes": changes,
                "count": str(total),
                "period": digest.period,
                "window": window_text(digest),
            }
        )
        body = render_digest(digest, self.renderer, subject)
        mail = self._mail(subject, body.text, body.html, f"digest.{digest.digest_id}")
        mail["X-Pgherald-Digest"] = header_text(digest.key)
        mail["X-Pgherald-Changes"] = str(total)
        return mail

    # -- the mail and the wire -------------------------------------------------------------

    def _id(self, value: str) -> str:
        return hashlib.sha256(f"{self.name}\x00{value}".encode()).hexdigest()[:32]

    def _mail(self, subject: str, text: str, html: str, message_id: str) -> EmailMessage:
        mail = EmailMessage(policy=SMTP)
        mail["From"] = self.sender
        mail["To"] = ", ".join(self.recipients)
        mail["Subject"] = subject
        mail["Date"] = format_datetime(datetime.now(UTC))
        mail["Message-ID"] = f"<{message_id}@{self._domain}>"
        mail["Auto-Submitted"] = "auto-generated"
        mail["X-Pgherald-Sink"] = header_text(self.name)
        mail.set_content(text, cte="quoted-printable")
        mail.add_alternative(html, subtype="html", cte="quoted-printable")
        return mail

    def _client(self) -> aiosmtplib.SMTP:
        s = self.smtp
        assert s is not None
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.ssl,
            start_tls=s.starttls,
            validate_certs=s.verify,
            cert_bundle=s.ca_file,
            username=s.username,
            password=s.password,
            timeout=s.timeout,
            local_hostname=s.helo,
        )

    async def _send_all(self, mails: Sequence[EmailMessage]) -> list[Outcome]:
        """Each mail over one connection; the outcomes in order."""
        if self.smtp is None:
            missing = PermanentSinkError(
                f"sink {self.name!r} mails through the mail server of the settings, and this"
                " pgherald has none: add an [smtp] table to its configuration file"
            )
            return [missing] * len(mails)
        outcomes: list[Outcome] = []
        client = self._client()
        try:
            try:
                await client.connect()
            except Exception as e:  # connecting, TLS or logging in: the same for every mail
                return [classify(e, self._target)] * len(mails)
            for mail in mails:
                if outcomes and isinstance(outcomes[-1], _ServerWide):
                    outcomes.append(_not_sent(outcomes[-1]))
                    continue
                outcomes.append(await self._send_one(client, mail))
        finally:
            await _quit(client)
        return outcomes

    async def _send_one(self, client: aiosmtplib.SMTP, mail: EmailMessage) -> Outcome:
        try:
            refused, _ = await client.send_message(
                mail, sender=self._envelope_from, recipients=self._envelope_to
            )
        except Exception as e:
            return classify(e, self._target)
        if refused:
            log.warning(
                "sink %s: %s accepted %s but refused %s",
                self.name,
                self._target,
                mail["Message-ID"],
                "; ".join(f"{a} ({r.code} {_one_line(r.message)})" for a, r in refused.items()),
            )
        return None


async def _quit(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await client.quit()
    except Exception:  # a polite goodbye that fails changes nothing
        client.close()


def _not_sent(cause: Outcome) -> RetryableSinkError:
    """The error of a mail held back behind a failure of the whole server: retryable (it
    was never tried), whatever the cause."""
    return RetryableSinkError(f"not sent: {cause}")


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _cert_problem(error: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def classify(error: BaseException, target: str) -> SinkError:
    """A failure as an outcome: 4xx and connection trouble retryable, 5xx permanent."""
    where = f"smtp {target}"
    cert = _cert_problem(error)
    if cert is not None:
        return PermanentSinkError(
            f"{where}: the server's certificate is not trusted ({cert.verify_message});"
            " set ca_file to the CA that signed it"
        )
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in error.recipients]
        detail = "; ".join(
            f"{r.recipient}: {r.code} {_one_line(r.message)}" for r in error.recipients
        )
        if any(400 <= c < 500 for c in codes):
            return RetryableSinkError(f"{where} refused every recipient for now: {detail}")
        return PermanentSinkError(f"{where} refused every recipient: {detail}")
    if isinstance(error, aiosmtplib.SMTPResponseException):
        code = error.code
        what = f"{where} answered {code} {_one_line(error.message)}"
        if isinstance(error, aiosmtplib.SMTPAuthenticationError):
            what += " (logging in failed: check username and password)"
        elif isinstance(error, aiosmtplib.SMTPSenderRefused):
            what += f" (sender {error.sender} refused)"
        if code in _SERVER_WIDE_CODES or isinstance(error, aiosmtplib.SMTPConnectError):
            return _ServerWide(what)
        if 500 <= code < 600:
            return PermanentSinkError(what)
        return RetryableSinkError(what)
    if isinstance(error, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return _ServerWide(f"{where}: no answer in time")
    if isinstance(error, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError | OSError):
        return _ServerWide(f"{where}: {_one_line(error)}")
    if isinstance(error, aiosmtplib.SMTPNotSupported | aiosmtplib.SMTPException):
        # STARTTLS or AUTH not offered, and the like: the configuration must change.
        return PermanentSinkError(f"{where}: {_one_line(error)}")
    return RetryableSinkError(f"{where}: {type(error).__name__}: {_one_line(error)}")


# -- configuration ----------------------------------------------------------------------------


class _EmailOptions(Options):
    def addresses(self, key: str, *, required: bool = False) -> list[str]:
        """A list of addresses, or one string of them separated by commas."""
        self._used.add(key)
        value = self._options.get(key)
        if value is None or value == "" or value == []:
            if required:
                raise self._fail(f"option {key!r} is required")
            return []
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            items = [v.strip() for v in value]
        else:
            raise self._fail(f"option {key!r} must be a list of addresses or a comma string")
        items = [i for i in items if i]
        for item in items:
            check_address(item, lambda m: self._fail(f"option {key!r}: {m}"))
        if required and not items:
            raise self._fail(f"option {key!r} is required")
        return items


def check_address(value: str, fail: Any) -> str:
    """An address (``a@b.example`` or ``Name <a@b.example>``) or ``fail(message)``: one
    line, an ASCII address part (no SMTPUTF8), and a domain."""
    if any(not ch.isprintable() for ch in value):
        raise fail(f"{value!r} is not one line of printable text")
    _, addr = parseaddr(value)
    if not addr or not addr.isascii() or not _ADDR.match(addr):
        raise fail(f"{value!r} is not an e-mail address (like name@example.com)")
    return addr


SMTP_KEYS: Final = frozenset(
    {"host", "port", "ssl", "starttls", "username", "password", "timeout", "verify",
     "ca_file", "helo"}
)  # fmt: skip
"""The options that say which mail server to use and how (also the keys of ``[smtp]``)."""


def _server(options: _EmailOptions, fail: Callable[[str], ConfigError]) -> SmtpSettings:
    """The mail server of ``options`` (``host``, ``port``, TLS, login...), checked."""
    host = options.text("host", required=True)
    assert host is not None
    use_ssl = options.boolean("ssl", False)
    starttls = options.boolean("starttls", False)
    port = options.integer("port", 465 if use_ssl else 587 if starttls else 25, minimum=1)
    username = options.text("username")
    password = options.text("password")
    timeout = options.number("timeout", 30.0, minimum=0.001)
    verify = options.boolean("verify", True)
    ca_file = options.text("ca_file")
    helo = options.text("helo")
    if port > 65535:
        raise fail("option 'port' must be at most 65535")
    if use_ssl and starttls:
        raise fail("options 'ssl' (TLS from the start) and 'starttls' exclude each other")
    if (username is None) != (password is None):
        raise fail("options 'username' and 'password' go together")
    if username is not None and not (use_ssl or starttls):
        raise fail("a password would travel in clear text: set starttls = true or ssl = true")
    if ca_file is not None and not (use_ssl or starttls):
        raise fail("option 'ca_file' needs starttls = true or ssl = true")
    return SmtpSettings(
        host=host,
        port=port,
        starttls=starttls,
        ssl=use_ssl,
        username=username,
        password=password,
        timeout=timeout,
        verify=verify,
        ca_file=ca_file,
        helo=helo,
    )


class _SmtpTable(_EmailOptions):
    """The settings' ``[smtp]`` table, read like a sink's options, its errors saying where."""

    def _fail(self, message: str) -> ConfigError:
        return ConfigError(f"[smtp] in the configuration: {message.replace('option', 'key')}")


def shared_server(table: Mapping[str, Any]) -> tuple[SmtpSettings, str]:
    """The mail server of the settings' ``[smtp]`` table and its sender (``from``), for the
    e-mail sinks with ``smtp = "settings"`` (those the web console makes for its users)."""
    options = _SmtpTable("[smtp]", "email", table)
    server = _server(options, options._fail)
    sender = options.text("from", required=True)
    assert sender is not None
    options.check_unknown()
    check_address(sender, lambda m: options._fail(f"key 'from': {m}"))
    return server, sender


def from_config(config: SinkConfig) -> EmailSink:
    options = _EmailOptions(config.name, config.kind, config.options)
    where = f"sink {config.name!r} (email)"

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    shared = options.text("smtp")
    smtp: SmtpSettings | None = None
    if shared is not None:
        if shared != "settings":
            raise fail(f"option 'smtp' can only be 'settings' (the [smtp] table), not {shared!r}")
        given = sorted(SMTP_KEYS & set(config.options))
        if given:
            raise fail(
                f"option(s) {', '.join(map(repr, given))} name a mail server, and smtp ="
                " 'settings' says to use the one of the settings: choose one"
            )
    else:
        smtp = _server(options, fail)
    sender = options.text("from", required=shared is None)
    recipients = options.addresses("to", required=True)
    subject = options.text("subject")
    mode = options.text("mode", "change")
    period = options.text("period")
    send_empty = options.boolean("send_empty", False)
    delay = options.number("delay", 60.0, minimum=0.0)
    max_items = options.integer("max_items", 200, minimum=1)
    zone_name = options.text("timezone")
    locale = options.text("locale")
    options.check_unknown()

    if sender is not None:
        check_address(sender, lambda m: fail(f"option 'from': {m}"))
    if mode not in ("change", "digest"):
        raise fail(f"option 'mode' must be 'change' or 'digest', not {mode!r}")
    digest_only = sorted({"period", "send_empty", "delay", "max_items"} & set(config.options))
    if mode == "change" and digest_only:
        raise fail(f"option(s) {', '.join(map(repr, digest_only))} are for mode = 'digest'")
    try:
        zone = check_timezone(zone_name or "UTC")
        if locale is not None:
            check_locale(locale)
    except ConfigError as e:
        raise fail(str(e)) from None
    digest = None
    if mode == "digest":
        chosen = period or "day"
        if chosen not in PERIODS:
            raise fail(f"option 'period' must be one of {', '.join(PERIODS)}, not {chosen!r}")
        digest = DigestPolicy(
            period=_period(chosen),
            send_empty=send_empty,
            delay=delay,
            max_items=max_items,
            timezone=zone,
        )
    return EmailSink(
        config.name,
        smtp,
        sender,
        recipients,
        subject=subject,
        digest=digest,
        locale=locale,
        timezone=zone_name,
        strictly_ordered=config.strictly_ordered,
    )


def _period(value: str) -> Period:
    for p in PERIODS:
        if p == value:
            return p
    raise ValueError(value)
