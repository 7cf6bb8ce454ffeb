"""Readable changes without a database: locales, time zones, NULL, long and hostile texts,
labels, display options, template overrides and the sandbox, feeds and digests."""

from __future__ import annotations

import html
import re
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import feedparser
import jinja2
import pytest

from pgherald.errors import ConfigError
from pgherald.events.model import ChangeEvent, RowImage
from pgherald.render import Display, Label, Renderer, StaticLinks, WebLinks, group
from pgherald.render.feed import FeedEntry, FeedInfo, document, entry_id, feed_uuid
from pgherald.render.values import Formatter, shorten, visible
from pgherald.sinks.feed import FeedOptions, new_token, with_token

COLUMNS = {
    "id": (23, "int4"),
    "first_name": (25, "text"),
    "last_name": (25, "text"),
    "salary": (1700, "numeric"),
    "hired_on": (1082, "date"),
    "seen_at": (1184, "timestamptz"),
    "notes": (25, "text"),
}


def loader(type_oid: int, text: str) -> Any:
    if type_oid == 23:
        return int(text)
    if type_oid == 1700:
        return Decimal(text)
    if type_oid == 1082:
        return date.fromisoformat(text)
    if type_oid == 1184:
        return datetime.fromisoformat(text)
    return text


def image(**values: str | None) -> RowImage:
    base: dict[str, str | None] = {
        "id": "7",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "salary": "5000.00",
        "hired_on": "2024-03-01",
        "seen_at": "2024-03-01 12:00:00+00",
        "notes": None,
    }
    base.update(values)
    return RowImage.from_texts(COLUMNS, base, loader)


WHEN = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def event(
    op: str = "update",
    old: RowImage | None = None,
    new: RowImage | None = None,
    changed: tuple[str, ...] = (),
    *,
    event_id: str = "L/1",
    watch: str = "employees",
    when: datetime = WHEN,
    key: dict[str, Any] | None = None,
    method: str = "logical",
    xid: int | None = 1,
    position: str = "0/1",
) -> ChangeEvent:
    return ChangeEvent(
        event_id, watch, op, "public", "employees",  # type: ignore[arg-type]
        {"id": "7"} if key is None else key, old, new, changed, xid, position,
        when, when, method,  # type: ignore[arg-type]
    )  # fmt: skip


DISPLAY = Display.from_mapping(
    "employees",
    {"name": "Employees", "label": "{last_name}, {first_name}", "columns": {"salary": "Salary"}},
)


def renderer(**kwargs: Any) -> Renderer:
    kwargs.setdefault("displays", {"employees": DISPLAY})
    return Renderer(**kwargs)


def full_values(markup: str) -> list[str]:
    """The full values of shortened fields, unescaped (what a reader sees when opening them)."""
    found = re.findall(r'<div class="pgh-full"><bdi>(.*?)</bdi></div>', markup, re.DOTALL)
    return [html.unescape(v) for v in found]


def plain(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


# -- values: locales and time zones -----------------------------------------------------------


@pytest.mark.parametrize(
    ("locale", "salary", "hired", "integer"),
    [
        ("en", "5,250.00", "Mar 1, 2024", "1,234,567"),
        ("en_GB", "5,250.00", "1 Mar 2024", "1,234,567"),
        ("de_DE", "5.250,00", "01.03.2024", "1.234.567"),
        ("fr_FR", "5\u202f250,00", "1 mars 2024", "1\u202f234\u202f567"),
    ],
)
def test_numbers_and_dates_follow_the_locale(
    locale: str, salary: str, hired: str, integer: str
) -> None:
    f = Formatter(locale)
    assert f.text(Decimal("5250.00")) == salary
    assert f.text(date(2024, 3, 1)) == hired
    assert f.text(1234567) == integer


def test_numerics_keep_their_scale_and_specials() -> None:
    f = Formatter("en")
    assert f.text(Decimal("5000.00")) == "5,000.00"
    assert f.text(Decimal("0.000100")) == "0.000100"
    assert f.text(Decimal("-12345678901234567890.123")) == "-12,345,678,901,234,567,890.123"
    assert f.text(Decimal("NaN")) == "NaN"
    assert f.text(Decimal("-Infinity")) == "-Infinity"
    assert f.text(float("inf")) == "Infinity"
    assert f.text(0.1) == "0.1"
    assert f.text(True) == "yes"
    assert f.text(None) == "(empty)"
    assert f.text(10**30) == "1,000,000,000,000,000,000,000,000,000,000"


def test_timestamps_are_shown_in_the_configured_zone() -> None:
    noon_utc = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    assert Formatter("en", "UTC").text(noon_utc) == "Mar 1, 2024, 12:00:00\u202fPM"
    assert Formatter("en", "America/New_York").text(noon_utc) == "Mar 1, 2024, 7:00:00\u202fAM"
    assert Formatter("de_DE", "Europe/Berlin").text(noon_utc) == "01.03.2024, 13:00:00"
    summer = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
    assert Formatter("de_DE", "Europe/Berlin").when(summer) == "01.07.2024, 14:00:00 CEST"
    # A timestamp without time zone is a wall-clock reading: never shifted.
    naive = datetime(2024, 3, 1, 12, 0)
    assert Formatter("en", "Asia/Tokyo").text(naive) == "Mar 1, 2024, 12:00:00\u202fPM"
    assert Formatter("en", "Asia/Tokyo").text(time(9, 30)) == "9:30:00\u202fAM"


def test_bad_locale_and_zone_are_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown locale 'xx_YY'"):
        Formatter("xx_YY")
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        Formatter("en", "Mars/Olympus")
    with pytest.raises(ConfigError, match="unknown time zone"):
        Formatter("en", "../../etc/passwd")


def test_a_change_rendered_in_german_in_berlin() -> None:
    r = renderer(locale="de_DE", timezone="Europe/Berlin")
    e = event("update", image(), image(salary="5250.00"), ("salary",))
    text = r.change_text(e)
    assert text.splitlines()[:3] == [
        "Employees: Lovelace, Ada changed",
        "01.03.2024, 13:00:00 CET · logical replication",
        "  Salary: 5.000,00 → 5.250,00",
    ]


# -- NULL, unknown, unchanged -----------------------------------------------------------------


def test_null_is_shown_as_empty_and_unknown_old_values_as_unknown() -> None:
    r = renderer()
    e = event("update", image(notes="old"), image(notes=None), ("notes",))
    assert "  Notes: old → (empty)" in r.change_text(e)
    out = str(r.change_html(e))
    assert '<span class="pgh-missing">(empty)</span>' in out
    no_old = event("update", None, image(salary="1.00"), ("salary",))
    text = r.change_text(no_old)
    assert "  Salary: (unknown) → 1.00" in text
    assert "(the old values were not recorded)" in text


def test_inserts_list_the_new_row_and_deletes_the_old_one() -> None:
    r = renderer()
    added = r.change_text(event("insert", None, image()))
    assert added.startswith("Employees: Lovelace, Ada added\n")
    assert "  Hired on: Mar 1, 2024" in added
    assert "  Notes: (empty)" in added
    gone = r.change_text(event("delete", image(), None))
    assert gone.startswith("Employees: Lovelace, Ada deleted\n")
    assert "  Salary: 5,000.00" in gone
    emptied = r.change_text(event("truncate", key={}))
    assert emptied.startswith("Employees: emptied (all rows deleted)\n")


def test_default_label_is_the_key_and_ids_are_not_grouped() -> None:
    r = Renderer()
    e = event("update", image(id="12345"), image(id="12345", salary="1"), ("salary",),
              key={"id": "12345"})  # fmt: skip
    assert r.view(e).headline == "employees: ID 12345 changed"
    by_id = Display.from_mapping("employees", {"label": "#{id}"})
    labelled = Renderer(displays={"employees": by_id})
    assert labelled.view(e).label == "#12345"


# -- long and hostile values ------------------------------------------------------------------

HOSTILE = [
    "<script>alert('x')</script>",
    '"><img src=x onerror=alert(1)>',
    "{{ 7*7 }} {% raw %}",
    "שלום עולם \u202eevil\u202c مرحبا",
    "tab\there\nnew line\r\nand \x01 control \x7f",
    "emoji 👩‍👩‍👧 and e\u0301",
]


@pytest.mark.parametrize("shorten_to", [10, 200])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_render_escaped_and_intact(value: str, shorten_to: int) -> None:
    r = renderer(shorten=shorten_to)
    e = event("update", image(notes="before"), image(notes=value), ("notes",))
    out = str(r.change_html(e))
    assert "<script>" not in out and "<img" not in out
    assert "49" not in out  # no template evaluated the value
    found = re.search(r'<span class="pgh-new">(.*)</span></dd>', out, re.DOTALL)
    assert found is not None
    new = found.group(1)
    one_line = visible(value, newlines=False)
    if shorten(one_line, shorten_to) != visible(value):  # cut, or on several lines
        summary = re.search(r"<summary><bdi>(.*?)</bdi></summary>", new, re.DOTALL)
        assert summary is not None
        assert html.unescape(summary.group(1)) == shorten(one_line, shorten_to)
        assert full_values(new) == [visible(value)]  # the whole value, every character kept
    else:
        # Right-to-left text sits in <bdi>, so it cannot reorder what follows it.
        assert new.startswith("<bdi>") and new.endswith("</bdi>")
        assert html.unescape(new[len("<bdi>") : -len("</bdi>")]) == one_line
    assert visible(value) == value or "\\x" in visible(value)


def test_a_very_long_value_is_shortened_with_the_whole_value_kept() -> None:
    long = "Lorem ipsum " * 20_000  # 240,000 characters
    r = renderer()
    e = event("update", image(notes="short"), image(notes=long), ("notes",))
    out = str(r.change_html(e))
    assert full_values(out) == [long]
    summary = re.search(r"<summary><bdi>(.*?)</bdi></summary>", out)
    assert summary is not None and len(summary.group(1)) == 200
    assert summary.group(1).endswith("…")
    text = r.change_text(e)
    assert "Notes, in full:" in text
    assert long.strip() in text


def test_rtl_values_are_isolated_in_plain_text() -> None:
    r = renderer()
    e = event("update", image(notes="a"), image(notes="مرحبا"), ("notes",))
    assert "  Notes: a → \u2068مرحبا\u2069" in r.change_text(e)


def test_control_characters_are_made_visible_never_dropped() -> None:
    assert visible("a\x00b\x1bc\u2028") == "a\\x00b\\x1bc\\u2028"
    assert visible("line\nnext", newlines=False) == "line↵ next"
    assert shorten("abcdef", 4) == "abc…"
    assert shorten("abe\u0301f", 4) == "ab…"  # the combining accent stays with its letter


def test_hostile_watch_titles_labels_and_column_titles_are_escaped() -> None:
    display = Display.from_mapping(
        "employees",
        {"name": "<b>Staff</b>", "label": "{first_name}", "columns": {"notes": "<i>N</i>"}},
    )
    r = Renderer(displays={"employees": display}, links=WebLinks("https://h.example"))
    e = event("update", image(first_name="<u>x</u>"), image(first_name="<u>x</u>", notes="1"),
              ("notes",))  # fmt: skip
    out = str(r.change_html(e))
    assert "<b>" not in out and "<i>" not in out and "<u>" not in out
    assert "&lt;b&gt;Staff&lt;/b&gt;" in out and "&lt;u&gt;x&lt;/u&gt;" in out


# -- display options and labels ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("{0.__class__}", "plain column names"),
        ("{first_name.__class__}", "plain column names"),
        ("{first_name[0]}", "plain column names"),
        ("{first_name!r}", "plain column names"),
        ("{first_name:>10}", "plain column names"),
        ("{}", "plain column names"),
        ("{first_name", "not a valid template"),
        ("just {{ braces }}", "names no column"),
    ],
)
def test_label_templates_allow_only_plain_names(label: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Label.parse(label)


def test_labels_render_with_literal_braces_and_missing_columns() -> None:
    label = Label.parse("{{{last_name}}} / {nope}")
    assert label.render({"last_name": "Lovelace"}) == "{Lovelace} / ?"
    assert Label.parse("last_name").columns == ("last_name",)


def test_display_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        Display.from_mapping("w", {"titel": "x"})
    with pytest.raises(ConfigError, match="columns must map"):
        Display.from_mapping("w", {"columns": {"a": ""}})
    for bad in ("../x", "/etc", "a/../../b", "a\\b"):
        with pytest.raises(ConfigError, match="inside the configured templates folder"):
            Display.from_mapping("w", {"templates": bad})
    d = Display.from_mapping("w", {"name": "W", "label": "{a}", "columns": {"a": "A"}})
    assert Display.from_mapping("w", d.to_mapping()) == d
    assert Display("w").column_title("hired_on") == "Hired on"
    assert Display("w").column_title("ID") == "ID"
    assert Display("w").column_title("user_id") == "User ID"
    assert Display("w").column_title("MixedCase") == "MixedCase"


# -- templates --------------------------------------------------------------------------------


def test_templates_are_overridden_globally_and_per_watch(tmp_path: Path) -> None:
    (tmp_path / "change.txt").write_text("GLOBAL {{ c.headline }}\n")
    (tmp_path / "emp").mkdir()
    (tmp_path / "emp" / "change.txt").write_text("EMP {{ c.label }}: {{ c.fields|length }}\n")
    display = Display.from_mapping("employees", {"label": "{first_name}", "templates": "emp"})
    r = Renderer(templates_dir=tmp_path, displays={"employees": display})
    e = event("update", image(), image(salary="1"), ("salary",))
    assert r.change_text(e) == "EMP Ada: 1\n"
    other = event("insert", None, image(), watch="other")
    assert r.change_text(other) == "GLOBAL other: ID 7 added\n"
    assert "<article" in str(r.change_html(e))  # no HTML override: the built-in one


def test_override_templates_are_sandboxed_and_html_ones_autoescaped(tmp_path: Path) -> None:
    (tmp_path / "change.txt").write_text("{{ c.__class__.__mro__ }}")
    (tmp_path / "change.html").write_text("<p>{{ c.label }}</p>")
    r = Renderer(templates_dir=tmp_path, displays={"employees": Display.from_mapping(
        "employees", {"label": "{first_name}"})})  # fmt: skip
    e = event("update", image(first_name="<script>"), image(first_name="<script>", salary="1"),
              ("salary",))  # fmt: skip
    with pytest.raises(jinja2.exceptions.SecurityError):
        r.change_text(e)
    assert str(r.change_html(e)) == "<p>&lt;script&gt;</p>"


def test_a_broken_override_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "change.txt").write_text("{% if %}")
    with pytest.raises(ConfigError, match=r"change.txt line 1"):
        Renderer(templates_dir=tmp_path).change_text(event("insert", None, image()))
    with pytest.raises(ConfigError, match="is not a folder"):
        Renderer(templates_dir=tmp_path / "missing")


# -- links --------------------------------------------------------------------------------------


def test_links_encode_hostile_names() -> None:
    web = WebLinks("https://h.example/")
    assert web.watch("a/../b?c") == "https://h.example/watches/a%2F..%2Fb%3Fc"
    assert web.row("w", '["1/2"]') == "https://h.example/watches/w/rows/%5B%221%2F2%22%5D"
    static = StaticLinks("../")
    assert static.watch("../../etc/passwd").startswith("../watches/etc-passwd-")
    assert static.watch("Ünïcode") != static.watch("unicode")
    assert "/" not in static.row_file("w", "x")[len("rows/") :]


# -- digests ------------------------------------------------------------------------------------


def test_day_digests_follow_the_readers_zone() -> None:
    late = datetime(2024, 3, 1, 23, 30, tzinfo=UTC)  # already March 2 in Berlin
    early = datetime(2024, 3, 1, 22, 30, tzinfo=UTC)  # March 1, 23:30 in Berlin
    events = [
        (3, event("insert", None, image(), event_id="c", when=late)),
        (2, event("insert", None, image(), event_id="b", when=early)),
        (1, event("insert", None, image(), event_id="a", when=early)),
    ]
    r = Renderer(timezone="Europe/Berlin")
    groups = group(events, "day", r.formatter.zone, limit=10)
    assert [(g.key, g.total) for g in groups] == [("day:2024-03-02", 1), ("day:2024-03-01", 2)]
    assert r.digest_title(groups[1]) == "employees: 2 changes on March 1, 2024"
    utc = group(events, "day", Renderer().formatter.zone, limit=10)
    assert [g.key for g in utc] == ["day:2024-03-01"]


def test_run_digests_group_snapshot_runs_and_transactions_and_keep_a_bounded_number() -> None:
    events = [
        (i, event("update", image(), image(salary=str(i)), ("salary",), event_id=f"S/9/{i}",
                  method="snapshot", position="9"))
        for i in range(10, 0, -1)
    ] + [(0, event("insert", None, image(), event_id="T/1", method="trigger", xid=77))]  # fmt: skip
    groups = group(events, "run", Renderer().formatter.zone, limit=5, keep=3)
    assert [(g.key, g.total, len(g.events), g.more) for g in groups] == [
        ("run:employees:9", 10, 3, 7),
        (f"xact:77:{WHEN.isoformat()}", 1, 1, 0),
    ]
    digest = Renderer().digest(groups[0])
    assert digest.title == "employees: 10 changes in snapshot run 9"
    assert "10 changes: 10 changed" in digest.text
    assert "… and 7 more changes not shown here." in digest.text
    assert digest.html.count("<article") == 3
    # Reading stops at the first event of a group beyond the limit.
    assert [g.key for g in group(events, "run", Renderer().formatter.zone, limit=1)] == [
        "run:employees:9"
    ]


# -- feeds ----------------------------------------------------------------------------------------


def feed_info(**kwargs: Any) -> FeedInfo:
    base: dict[str, Any] = {
        "id": feed_uuid("pgherald", "news", "2024-01-01T00:00:00+00:00"),
        "title": "News <&>",
        "subtitle": "Changes in Employees",
        "self_url": "https://h.example/feeds/tok.atom",
        "link": "https://h.example/",
        "updated": WHEN,
    }
    base.update(kwargs)
    return FeedInfo(**base)


def test_feed_documents_parse_without_errors_and_keep_hostile_text() -> None:
    r = renderer()
    hostile = "<script>x</script> \x01 \ufffe שלום"
    e = event("update", image(notes="a"), image(notes=hostile), ("notes",))
    view = r.view(e)
    entries = [FeedEntry("event:L/1", view.headline + " \x02", str(r.change_html(view)), WHEN,
                         WHEN, "https://h.example/x")]  # fmt: skip
    info = feed_info()
    atom = feedparser.parse(document("atom", info, entries))
    assert not atom.bozo, atom.get("bozo_exception")
    assert atom.version == "atom10"
    assert atom.feed.title == "News <&>"
    assert atom.feed.author == "pgherald"
    assert any(link.rel == "self" for link in atom.feed.links)
    (entry,) = atom.entries
    assert entry.id == entry_id(info.id, "event:L/1")
    assert entry.id.startswith("urn:uuid:")
    assert entry.title == "Employees: Lovelace, Ada changed \\x02"
    assert entry.updated_parsed[:6] == (2024, 3, 1, 12, 0, 0)
    assert "&lt;script&gt;x&lt;/script&gt; \\x01 \\ufffe שלום" in entry.content[0].value
    rss = feedparser.parse(document("rss", info, entries))
    assert not rss.bozo, rss.get("bozo_exception")
    assert rss.version == "rss20"
    assert rss.feed.title and rss.feed.link == "https://h.example/" and rss.feed.description
    (item,) = rss.entries
    assert item.id == entry.id
    assert item.guidislink is False
    assert re.fullmatch(r"Fri, 01 Mar 2024 12:00:00 \+0000", item.published)


def test_entry_ids_are_stable_and_differ_between_feeds() -> None:
    one = feed_uuid("pgherald", "news", "2024-01-01")
    assert entry_id(one, "event:L/1") == entry_id(feed_uuid("pgherald", "news", "2024-01-01"),
                                                   "event:L/1")  # fmt: skip
    assert entry_id(one, "event:L/1") != entry_id(feed_uuid("pgherald", "other", "2024-01-01"),
                                                   "event:L/1")  # fmt: skip
    assert entry_id(one, "event:L/1") != entry_id(one, "event:L/2")


def test_feed_options_are_checked() -> None:
    assert FeedOptions.parse("f", {}) == FeedOptions(None, None, 100, "change")
    parsed = FeedOptions.parse("f", {"entries": "20", "mode": "day", "title": "T"})
    assert (parsed.entries, parsed.mode, parsed.title) == (20, "day", "T")
    token = new_token()
    assert len(token) >= 40 and with_token({})["token"] != with_token({})["token"]
    assert with_token({"token": token}) == {"token": token}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mode": "week"}, "'mode' must be one of change, run, day, hour"),
        ({"entries": 0}, "'entries' must be at least 1"),
        ({"entries": 5000}, "'entries' is at most 1000"),
        ({"token": "short"}, "22 to 128 characters"),
        ({"token": "x" * 30 + "/"}, "22 to 128 characters"),
        ({"colour": "red"}, "unknown option(s) 'colour'"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            FeedOptions.parse("f", options)
