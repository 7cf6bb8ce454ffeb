"""The commands about presenting changes to people: ``watch display`` (a watch's display
name, row label and column titles), ``sink token`` and ``sink rotate-token`` (a feed's
secret URL), and ``export`` (feeds and HTML pages as static files).

Like ``cli_delivery``, they live apart from ``cli.py``, which registers them (``LEAVES``
get the connection options) and gives the settings at call time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pgherald import present


def _settings(ctx: click.Context) -> Any:
    from pgherald import cli

    return cli.settings_of(ctx)


def _presentation(ctx: click.Context, **overrides: Any) -> Any:
    from pgherald.presentation import Presentation

    return Presentation.of(_settings(ctx), **overrides)


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in values:
        column, sep, title = pair.partition("=")
        if not sep or not column:
            raise click.BadParameter(f"{pair!r} is not COLUMN=TITLE", param_hint="--column")
        out[column] = title
    return out


@click.command("display")
@click.argument("name")
@click.option("--title", help="The watch's display name ('' removes it).")
@click.option(
    "--label",
    help="A row's label: a column, or a template like '{last_name}, {first_name}' ('' removes it).",
)
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="COLUMN=TITLE",
    help="A column's title (repeatable; COLUMN= removes it).",
)
@click.option(
    "--templates",
    help="A folder inside the templates folder with this watch's own templates ('' removes it).",
)
@click.option(
    "--templates-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The templates folder (default: the settings' templates_dir).",
)
@click.option("--clear", is_flag=True, help="Forget the display options set so far first.")
@click.pass_context
def watch_display(
    ctx: click.Context,
    name: str,
    title: str | None,
    label: str | None,
    columns: tuple[str, ...],
    templates: str | None,
    templates_dir: Path | None,
    clear: bool,
) -> None:
    """Set how watch NAME is shown to people (feeds, pages, e-mail); with no option, show it."""
    from pgherald.presentation import update_display

    display = update_display(
        _settings(ctx),
        name,
        name=title,
        label=label,
        columns=_pairs(columns),
        templates=templates,
        clear=clear,
        presentation=_presentation(ctx, templates_dir=templates_dir),
    )
    click.echo(f"watch {present.clean(name, 60)} is shown as {present.clean(display.title, 60)}")
    if display.label is not None:
        click.echo(f"  rows are labelled {present.clean(display.label.source, 80)}")
    for column, column_title in sorted(display.columns.items()):
        click.echo(f"  column {present.clean(column, 40)}: {present.clean(column_title, 60)}")
    if display.templates is not None:
        click.echo(f"  templates from {present.clean(display.templates, 80)}")


def _show_urls(ctx: click.Context, token: str, base_url: str | None) -> None:
    from pgherald.render import WebLinks

    click.echo(token)
    base = _presentation(ctx, public_url=base_url).public_url
    if base:
        links = WebLinks(base)
        click.echo(f"  Atom: {links.feed(token, 'atom')}")
        click.echo(f"  RSS:  {links.feed(token, 'rss')}")


@click.command("token")
@click.argument("name")
@click.option("--base-url", help="The web app's public URL, to print the feed's URLs.")
@click.pass_context
def sink_token(ctx: click.Context, name: str, base_url: str | None) -> None:
    """Print the token of feed sink NAME (made now if it has none) and its URLs."""
    from pgherald import feeds

    _show_urls(ctx, feeds.feed_token(_settings(ctx), name), base_url)


@click.command("rotate-token")
@click.argument("name")
@click.option("--base-url", help="The web app's public URL, to print the feed's new URLs.")
@click.pass_context
def sink_rotate_token(ctx: click.Context, name: str, base_url: str | None) -> None:
    """Give feed sink NAME a new token: its old URLs stop working at once."""
    from pgherald import feeds

    _show_urls(ctx, feeds.rotate_token(_settings(ctx), name), base_url)


@click.command("export")
@click.option(
    "--feeds",
    "feeds_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write every feed here as <token>.atom and <token>.rss.",
)
@click.option(
    "--html",
    "html_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the HTML pages here (index, watches, runs, rows) with relative links.",
)
@click.option("--base-url", help="The public URL where the web app or the feeds are served.")
@click.option("--locale", help="Locale for numbers and dates (default: en).")
@click.option("--timezone", help="Time zone for times (default: UTC).")
@click.option(
    "--templates-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder of templates that override the built-in ones.",
)
@click.option(
    "--changes",
    type=click.IntRange(min=1, max=100_000),
    default=200,
    show_default=True,
    help="How many of each watch's newest changes the HTML pages show.",
)
@click.pass_context
def export(
    ctx: click.Context,
    feeds_dir: Path | None,
    html_dir: Path | None,
    base_url: str | None,
    locale: str | None,
    timezone: str | None,
    templates_dir: Path | None,
    changes: int,
) -> None:
    """Write feeds and HTML pages as static files (for a web server, or cron)."""
    from pgherald import feeds, pages

    if feeds_dir is None and html_dir is None:
        raise click.UsageError("say what to export: --feeds DIR and/or --html DIR")
    settings = _settings(ctx)
    shown = _presentation(
        ctx, public_url=base_url, locale=locale, timezone=timezone, templates_dir=templates_dir
    )
    if feeds_dir is not None:
        exported = feeds.export_feeds(settings, feeds_dir, shown)
        for feed in exported:
            names = ", ".join(str(p) for p in feed.files)
            click.echo(f"feed {present.clean(feed.sink, 60)}: {names}")
        if not exported:
            click.echo("no feed sinks: add one with `pgherald sink add NAME feed`")
    if html_dir is not None:
        site = pages.export_html(settings, html_dir, shown, changes_per_watch=changes)
        click.echo(
            f"wrote {site.pages} pages to {site.folder} ({site.watches} watches, {site.runs}"
            f" runs, {site.rows} rows); open {site.folder / 'index.html'}"
        )


COMMANDS_ON_WATCH = (watch_display,)
"""What ``cli`` adds to the ``watch`` group."""
COMMANDS_ON_SINK = (sink_token, sink_rotate_token)
"""What ``cli`` adds to the ``sink`` group (``cli_delivery.sink``)."""
COMMANDS = (export,)
"""What ``cli`` adds to ``main``."""
LEAVES = (watch_display, sink_token, sink_rotate_token, export)
"""The commands that take the connection options."""
