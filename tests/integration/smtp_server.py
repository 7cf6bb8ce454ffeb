"""A real SMTP server for the e-mail sink's tests: aiosmtpd on a free loopback port, with
STARTTLS or TLS from the start (a self-signed certificate made by ``openssl`` for the
test) and AUTH, recording every mail it accepts and answering as the test says."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

USER, PASSWORD = "herald", "s3cret-Pa55word"


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def make_cert(folder: Path) -> Cert:
    """A self-signed certificate for localhost and 127.0.0.1, valid for two days."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Cert(cert, key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls: bool
    authenticated: bool

    @property
    def message(self) -> EmailMessage:
        parsed = BytesParser(policy=policy.default).parsebytes(self.content)
        assert isinstance(parsed, EmailMessage)
        return parsed


Reply = Callable[[str], str | None]
"""Gets the recipient (RCPT) or the mail's text (DATA); returns an SMTP reply to refuse, or
None to accept."""


class MailServer:
    """``mode``: ``starttls`` (offers STARTTLS, AUTH only after it), ``ssl`` (TLS from the
    start) or ``plain``."""

    def __init__(
        self,
        cert: Cert,
        mode: Literal["starttls", "ssl", "plain"] = "starttls",
        *,
        auth: bool = True,
    ) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.rcpt_reply: Reply = lambda address: None
        self.data_reply: Reply = lambda text: None
        self.logins: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert.cert, cert.key)
        kwargs: dict[str, Any] = {"server_hostname": "localhost", "ident": "test-smtpd"}
        if mode == "starttls":
            kwargs["tls_context"] = context
        elif mode == "ssl":
            kwargs["ssl_context"] = context
        if auth:
            kwargs["authenticator"] = self._authenticate
            # aiosmtpd only counts STARTTLS as TLS; with TLS from the start it is TLS anyway.
            kwargs["auth_require_tls"] = mode == "starttls"
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> MailServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        with self._lock:
            self.logins.append((login, password))
        return AuthResult(success=login == USER and password == PASSWORD, handled=False)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        refusal = self.rcpt_reply(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or envelope.content
        refusal = self.data_reply(content.decode("utf-8", "replace"))
        if refusal is not None:
            return refusal
        transport = server.transport
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )
        with self._lock:
            self.received.append(
                Received(
                    envelope.mail_from,
                    tuple(envelope.rcpt_tos),
                    content,
                    tls,
                    bool(session.authenticated),
                )
            )
        return "250 Message accepted"

    def messages(self) -> list[EmailMessage]:
        with self._lock:
            return [r.message for r in self.received]


@dataclass
class Silent:
    """A TCP listener that accepts connections and never says a word (a hung server)."""

    port: int
    sock: socket.socket

    @classmethod
    def start(cls) -> Silent:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        return cls(sock.getsockname()[1], sock)

    def stop(self) -> None:
        self.sock.close()


def parts(message: EmailMessage) -> tuple[str, str]:
    """The plain-text and HTML parts of a multipart/alternative mail."""
    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    return str(plain.get_content()), str(html.get_content())


def running(server: MailServer) -> Iterator[MailServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()
