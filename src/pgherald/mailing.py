"""Wiring of the sinks that write for people (e-mail): the store's presentation settings
for them, and which sinks the digest job serves instead of the delivery engine.

Both the composition root (``app.Delivery``, for ``pgherald run`` and ``deliver``) and
``pgherald digests send`` use it, so a digest sink is never given to the engine (which
would take its deliveries one by one) and always renders like the feeds and pages do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.delivery.digests import DigestJob
from pgherald.delivery.engine import RetryPolicy
from pgherald.errors import ConfigError
from pgherald.presentation import Presentation, displays
from pgherald.render import WebLinks
from pgherald.sinks.base import Sink
from pgherald.sinks.digest import DigestSink, digest_policy
from pgherald.store import deliveries, migrations
from pgherald.store.deliveries import StoredSink


def use_presentation(settings: Settings, sinks: Sequence[object]) -> None:
    """Gives every sink that renders for people (``use_settings``) the store's locale, time
    zone, templates folder, watch displays and, with a public URL, links to the console;
    and e-mail sinks with ``smtp = "settings"`` the settings' mail server."""
    wanting = [s for s in sinks if callable(getattr(s, "use_settings", None))]
    if not wanting:
        return
    presentation = Presentation.of(settings)
    with connect(settings, autocommit=True) as conn:
        known = displays(conn, settings.schema)
    for sink in wanting:
        # Sinks that mail through the settings' server ([smtp]: the console's self-service
        # e-mail) get it here, so its password is kept in the configuration, not the store.
        shared = {"smtp": settings.smtp} if getattr(sink, "shared_smtp", False) else {}
        sink.use_settings(  # type: ignore[attr-defined]
            locale=presentation.locale,
            timezone=presentation.timezone,
            templates_dir=str(presentation.templates_dir) if presentation.templates_dir else None,
            displays=known,
            links=WebLinks(presentation.public_url) if presentation.public_url else None,
            **shared,
        )


def split(
    built: Mapping[str, tuple[Sink, StoredSink]],
) -> tuple[dict[str, tuple[Sink, StoredSink]], dict[str, tuple[DigestSink, StoredSink]]]:
    """``(the engine's sinks, the digest job's sinks)``."""
    engine: dict[str, tuple[Sink, StoredSink]] = {}
    digests: dict[str, tuple[DigestSink, StoredSink]] = {}
    for name, (sink, stored) in built.items():
        if digest_policy(sink) is not None:
            digests[name] = (cast(DigestSink, sink), stored)
        else:
            engine[name] = (sink, stored)
    return engine, digests


def digest_job(
    settings: Settings,
    names: Sequence[str] = (),
    *,
    policy: RetryPolicy | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DigestJob:
    """A digest job for the enabled digest sinks (those named, or all); a name that is not
    a digest sink is one ConfigError."""
    from pgherald import app  # app wires this module in: import it when called

    with connect(settings, autocommit=True) as conn:
        migrations.require_current(conn, settings.schema)
        stored = {s.name: s for s in deliveries.list_sinks(conn, settings.schema)}
    for name in names:
        if name not in stored:
            raise ConfigError(f"no sink named {name!r} (see `pgherald sink list`)")
    built: dict[str, tuple[Sink, StoredSink]] = {}
    for s in stored.values():
        if (names and s.name not in names) or not s.enabled:
            continue
        sink = (overrides or {}).get(s.name) or app.build_sink(app.sink_config(s))
        built[s.name] = (sink, s)
    _, digests = split(built)
    for name in names:
        if name not in digests:
            raise ConfigError(
                f"sink {name!r} does not send digests"
                + (" (it is disabled)" if not stored[name].enabled else "")
            )
    use_presentation(settings, [sink for sink, _ in digests.values()])
    return DigestJob(settings, digests, policy=policy)
