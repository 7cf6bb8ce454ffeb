"""``pgherald run`` as a daemon, in a subprocess: running only some parts, reloading its
configuration on SIGHUP, structured logs, and no secret in its logs, ever.

Each test drives the installed command against a real database and a real webhook
receiver (``daemon_support.Receiver``), and looks at what happened in the database and at
the receiver rather than only at what the daemon says.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgherald import admin, routing_admin
from pgherald.config import Settings, load_settings
from pgherald.db.embedded import free_port
from tests import capture_harness as h
from tests.acceptance._cli import assert_fails, assert_ok, cli
from tests.conftest import Database
from tests.daemon_support import (
    Answer,
    Daemon,
    NotifySocket,
    Receiver,
    json_lines,
    toml_string,
    write_config,
)
from tests.faults import delivery_harness as d
from tests.integration.smtp_server import MailServer, make_cert


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def count(db: Database, query: str) -> int:
    [(n,)] = db.execute(query)
    assert isinstance(n, int)
    return n


def connections(db: Database, application: str) -> int:
    return count(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        f" AND application_name LIKE '{application}%'",
    )


# -- only some parts ------------------------------------------------------------------------------


def test_parts_can_run_in_separate_processes(db: Database, receiver: Receiver) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = h.install(db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"))
    routing_admin.add_sink(settings, "hook", "webhook", options={"url": receiver.url})
    routing_admin.subscribe(settings, "hook", ["t"])

    # capture only: events reach the change log, nobody routes or delivers them
    capture = Daemon(settings, "--no-delivery", "--no-snapshots").start()
    try:
        capture.wait_ready()
        db.execute("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 5) g")
        h.catch_up(settings)
        assert len(h.stored_events(settings, "t")) == 5
        assert connections(db, "pgherald-router") == 0
        assert connections(db, "pgherald-deliver") == 0
        assert count(db, "SELECT count(*) FROM pgherald.deliveries") == 0
        status, _ = capture.terminate_timed()
        assert status == 0, capture.log()
        log = capture.log()
        assert "starting (capture)" in log
        assert "capturing trigger watches 'pgherald_sentinel', 't' from the trigger queue" in log
        assert "stopped cleanly" in log
    finally:
        capture.close()

    # delivery only: what was captured is delivered; new changes stay in the trigger queue
    delivery = Daemon(settings, "--no-capture", "--no-snapshots").start()
    try:
        wait_for(lambda: len(receiver.keys()) == 5, "the five events at the receiver")
        db.execute("INSERT INTO t VALUES (6, 'b')")
        time.sleep(1.0)  # not proof of anything: the checks below are
        assert len(h.stored_events(settings, "t")) == 5
        assert connections(db, "pgherald-trigger") == 0
        assert connections(db, "pgherald-router") > 0
        status, _ = delivery.terminate_timed()
        assert status == 0, delivery.log()
        assert "starting (delivery)" in delivery.log()
        assert "delivered 5 to 'hook'" in delivery.log(), delivery.log()
        print(delivery.log())
    finally:
        delivery.close()

    assert_fails(
        cli("run", "--no-capture", "--no-snapshots", "--no-delivery", dsn=db.dsn), "nothing to run"
    )


# -- reloading ---------------------------------------------------------------------------------


def config_text(
    settings: Settings,
    receivers: dict[str, Receiver],
    watches: list[tuple[str, str]],
    subscriptions: list[tuple[str, list[str]]],
    extra: str = "",
) -> str:
    lines = [
        f"dsn = {toml_string(settings.dsn)}",
        f"slot = {toml_string(settings.slot)}",
        f"batch_interval = {settings.batch_interval}",
        'shutdown_timeout = "20s"',
        extra,
    ]
    for table, method in watches:
        lines += ["[[watch]]", f"table = {toml_string(table)}", f"method = {toml_string(method)}"]
    for name, r in receivers.items():
        lines += [
            "[[sink]]",
            f"name = {toml_string(name)}",
            'kind = "webhook"',
            "[sink.options]",
            f"url = {toml_string(r.url)}",
        ]
    for sink, names in subscriptions:
        lines += [
            "[[subscription]]",
            f"sink = {toml_string(sink)}",
            f"watches = {json.dumps(names)}",
        ]
    return "\n".join(lines) + "\n"


def test_sighup_reloads_the_configuration(db: Database, tmp_path: Path) -> None:
    db.execute("CREATE TABLE alpha (id int PRIMARY KEY); CREATE TABLE beta (id int PRIMARY KEY)")
    first, second = Receiver(), Receiver()
    notify = NotifySocket()
    config = tmp_path / "pgherald.toml"
    settings = h.install(db.dsn, slot=False)
    write_config(
        config, config_text(settings, {"one": first}, [("alpha", "trigger")], [("one", ["alpha"])])
    )
    admin.init(load_settings(config))
    daemon = Daemon(settings, config=config, env=notify.env()).start()
    try:
        notify.wait_for("READY=1")
        daemon.wait_ready()
        db.execute("INSERT INTO alpha VALUES (1)")
        wait_for(lambda: len(first.keys()) == 1, "alpha 1 at receiver one")

        # add a logical watch, a second sink and subscriptions; JSON and debug logs from now on
        write_config(
            config,
            config_text(
                settings,
                {"one": first, "two": second},
                [("alpha", "trigger"), ("beta", "logical")],
                [("one", ["alpha", "beta"]), ("two", ["alpha"])],
                extra='log_format = "json"\nlog_level = "debug"',
            ),
        )
        mark = len(daemon.log())
        daemon.signal(signal.SIGHUP)
        found = daemon.wait_log('"message": "configuration reloaded: ', mark)
        notify.wait_for("RELOADING=1")
        # JSON from the summary on (the engine may take up sink 'two' while the file is
        # applied, before the format changes)
        reloaded = daemon.log().rindex("\n", 0, found) + 1
        records = json_lines(daemon.log()[reloaded:])
        [summary] = [r for r in records if r["message"].startswith("configuration reloaded")]
        assert {"time", "level", "logger", "message"} <= summary.keys()
        for change in ("added watch 'beta'", "added sink 'two'", "subscribed", "restarted capture"):
            assert change in summary["message"], summary
        # the running delivery engine serves the new sink by itself: no restart
        assert "restarted delivery" not in summary["message"], summary
        daemon.wait_log("delivering to sink 'two' (webhook) from now on", mark)
        db.execute("INSERT INTO alpha VALUES (2); INSERT INTO beta VALUES (1)")
        wait_for(lambda: len(first.keys()) == 3, "alpha 2 and beta 1 at receiver one")
        wait_for(lambda: len(second.keys()) == 1, "alpha 2 at receiver two")
        assert sorted(json.loads(b)["table"] for _, b in first.received()) == [
            "alpha",
            "alpha",
            "beta",
        ]
        assert any(r["level"] == "debug" for r in json_lines(daemon.log()[reloaded:]))

        # remove the alpha watch and sink two: alpha is no longer captured, two is disabled
        write_config(
            config,
            config_text(
                settings, {"one": first}, [("beta", "logical")], [("one", ["beta"])],
                'log_format = "json"',
            ),
        )  # fmt: skip
        mark = len(daemon.log())
        daemon.signal(signal.SIGHUP)
        daemon.wait_log('"message": "configuration reloaded: ', mark)
        text = daemon.log()[mark:]
        assert "removed watch 'alpha'" in text and "disabled sink 'two'" in text
        daemon.wait_log("sink 'two' was disabled or removed: delivery to it stops", mark)
        assert [w.name for w in admin.list_watches(settings)] == ["beta", "pgherald_sentinel"]
        assert {s.name: s.enabled for s in routing_admin.list_sinks(settings)} == {
            "one": True,
            "two": False,
        }
        db.execute("INSERT INTO alpha VALUES (3); INSERT INTO beta VALUES (2)")
        wait_for(lambda: len(first.keys()) == 4, "beta 2 at receiver one")
        h.catch_up(settings)
        assert [e.key for e in h.stored_events(settings, "alpha")] == [{"id": "1"}, {"id": "2"}]

        # an invalid file: one clear error, nothing changed, capture and delivery go on
        good = config.read_text()
        for bad, fragment in [
            (good + '[[watch]]\ntable = "no_such_table"\n', "no_such_table"),
            ("batch_size = 0\n" + good, "batch_size must be at least 1"),
            (good + "[[watch]]\ntable = \n", "is not valid TOML"),
            (good.replace("[[subscription]]", '[[subscription]]\nops = ["nope"]'), "nope"),
            (good.replace("dsn = ", 'schema = "elsewhere"\ndsn = '), "schema cannot change"),
        ]:
            write_config(config, bad)
            mark = len(daemon.log())
            daemon.signal(signal.SIGHUP)
            daemon.wait_log("configuration not reloaded", mark)
            errors = [r for r in json_lines(daemon.log()[mark:]) if r["level"] == "error"]
            assert len(errors) == 1, errors
            assert fragment in errors[0]["message"], errors
            assert "goes on with the configuration it had" in errors[0]["message"]
        assert daemon.alive()
        db.execute("INSERT INTO beta VALUES (3)")
        wait_for(lambda: len(first.keys()) == 5, "beta 3 at receiver one")
        assert [w.name for w in admin.list_watches(settings)] == ["beta", "pgherald_sentinel"]

        status, _ = daemon.terminate_timed()
        assert status == 0, daemon.log()[-3000:]
        notify.wait_for("STOPPING=1")
    finally:
        log = daemon.log()
        daemon.close()
        first.close()
        second.close()
        notify.close()
    assert "Traceback" not in log
    # nothing delivered twice, nothing that the log lacks
    truth = {k for w in ("alpha", "beta") for k in d.log_truth(settings, w)}
    for r in (first, second):
        keys = r.keys()
        assert len(keys) == len(set(keys))
        assert set(keys) <= truth


def test_deliver_serves_only_its_sinks_reloads_on_sighup_and_stops_cleanly(
    db_primary: Database, tmp_path: Path
) -> None:
    """``pgherald deliver --sink`` is the daemon's delivery part alone: it serves the sinks
    it is given and no other, applies a reloaded file (here: a sink's new URL), and stops on
    SIGTERM as ``pgherald run`` does."""
    db = db_primary
    db.execute("CREATE TABLE alpha (id int PRIMARY KEY)")
    first, second, moved = Receiver(), Receiver(), Receiver()
    config = tmp_path / "pgherald.toml"
    settings = h.install(db.dsn, slot=False)
    subscriptions = [("one", ["alpha"]), ("two", ["alpha"])]
    write_config(
        config,
        config_text(settings, {"one": first, "two": second}, [("alpha", "trigger")], subscriptions),
    )
    admin.init(load_settings(config))
    capture = Daemon(settings, "--no-delivery", config=config).start()
    worker = Daemon(settings, "--sink", "one", config=config, subcommand="deliver").start()
    try:
        capture.wait_ready()
        worker.wait_log("routing the change log and delivering to sinks 'one' (webhook)")
        db.execute("INSERT INTO alpha VALUES (1)")
        wait_for(lambda: len(first.keys()) == 1, "alpha 1 at receiver one")
        assert "starting (delivery (only to sinks 'one'))" in worker.log()
        wait_for(lambda: d.delivery_statuses(settings, "two") == {"pending": 1}, "routed to two")
        assert second.keys() == []  # routed to 'two', but this worker does not serve it

        # the file moves sink 'one' to another URL: the reloaded worker sends there
        write_config(
            config,
            config_text(
                settings,
                {"one": moved, "two": second},
                [("alpha", "trigger")],
                subscriptions,
                'log_format = "json"',
            ),
        )
        mark = len(worker.log())
        worker.signal(signal.SIGHUP)
        found = worker.wait_log('"message": "configuration reloaded: ', mark)
        assert "updated sink 'one'" in worker.log()[found:], worker.log()[mark:]
        worker.wait_log("sink 'one' changed: delivering with its new definition", mark)
        db.execute("INSERT INTO alpha VALUES (2)")
        wait_for(lambda: len(moved.keys()) == 1, "alpha 2 at one's new URL")
        assert len(first.keys()) == 1 and second.keys() == []

        status, seconds = worker.terminate_timed()
        assert status == 0, worker.log()[-3000:]
        assert seconds < 20
        assert '"message": "stopped cleanly' in worker.log(), worker.log()[-3000:]
        assert d.delivery_statuses(settings, "one") == {"delivered": 2}
        assert d.delivery_statuses(settings, "two") == {"pending": 2}
        assert capture.terminate_timed()[0] == 0, capture.log()[-3000:]
    finally:
        print(f"capture's log:\n{capture.log()[-3000:]}\nworker's log:\n{worker.log()[-3000:]}")
        worker.close()
        capture.close()
        for r in (first, second, moved):
            r.close()


def test_sinks_made_in_another_shell_are_served_while_it_runs(db: Database) -> None:
    """``pgherald sink add``, ``subscribe``, ``sink disable``, ``enable`` and ``remove`` in
    other processes while ``pgherald run`` runs: each takes effect within seconds, without
    a reload."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = h.install(db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"))
    receiver = Receiver()
    daemon = Daemon(settings).start()
    try:
        daemon.wait_ready()
        assert_ok(cli("sink", "add", "hook", "webhook", "-o", f"url={receiver.url}", dsn=db.dsn))
        assert_ok(cli("subscribe", "hook", "t", dsn=db.dsn))
        db.execute("INSERT INTO t VALUES (1)")
        started = time.monotonic()
        wait_for(lambda: len(receiver.keys()) == 1, "row 1 at the new sink", timeout=15)
        print(f"a sink added by `pgherald sink add` delivered in {time.monotonic() - started:.2f}s")
        daemon.wait_log("delivering to sink 'hook' (webhook) from now on")

        receiver.answer = lambda key, body: Answer(status=503)
        db.execute("INSERT INTO t VALUES (2)")
        wait_for(lambda: receiver.requests >= 3, "row 2 tried and retried")  # backoff: 0.5 s, 1 s
        mark = len(daemon.log())
        assert cli("sink", "disable", "hook", dsn=db.dsn).stdout == "disabled sink 'hook'\n"
        assert (
            "hook  webhook  pgherald  DISABLED  watches: t"
            in cli("sink", "list", dsn=db.dsn).stdout
        )
        daemon.wait_log("sink 'hook' was disabled or removed", mark)
        wait_for(lambda: connections(db, "pgherald-deliver-hook") == 0, "its lanes closed")
        receiver.answer = lambda key, body: Answer()
        tried = receiver.requests
        time.sleep(6.0)  # longer than the retry delays and the look at idle sinks
        assert receiver.requests == tried
        assert d.delivery_statuses(settings, "hook") == {"delivered": 1, "failed": 1}

        assert cli("sink", "enable", "hook", dsn=db.dsn).stdout == "enabled sink 'hook'\n"
        # at its next attempt's time (a few seconds of backoff at most by now)
        wait_for(lambda: len(receiver.keys()) == 2, "row 2 after enabling", timeout=40)
        assert cli("sink", "enable", "hook", dsn=db.dsn).stdout == (
            "sink 'hook' was enabled already\n"
        )

        mark = len(daemon.log())
        assert_ok(cli("sink", "remove", "hook", dsn=db.dsn))
        daemon.wait_log("sink 'hook' was disabled or removed", mark)
        assert_fails(cli("sink", "disable", "hook", dsn=db.dsn), "no sink named 'hook'")
        status, _ = daemon.terminate_timed()
        assert status == 0, daemon.log()[-3000:]
    finally:
        log = daemon.log()
        daemon.close()
        receiver.close()
    assert "Traceback" not in log
    assert "delivered 2 to 'hook'" in log, log[-3000:]


def test_sighup_with_a_changed_smtp_table_restarts_delivery(db: Database, tmp_path: Path) -> None:
    """E-mail sinks with ``smtp = "settings"`` (the console's self-service) mail through
    the server of ``[smtp]``: a reload that changes it restarts delivery, and the next mail
    goes to the new server."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    cert = make_cert(tmp_path)
    first = MailServer(cert, "plain", auth=False).start()
    second = MailServer(cert, "plain", auth=False).start()
    settings = h.install(db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"))
    config = tmp_path / "pgherald.toml"

    def write(port: int) -> None:
        write_config(
            config,
            f"""dsn = {toml_string(settings.dsn)}
slot = {toml_string(settings.slot)}
[smtp]
host = "127.0.0.1"
port = {port}
from = "herald@example.com"
[[sink]]
name = "self-mail"
kind = "email"
[sink.options]
smtp = "settings"
to = "me@example.com"
[[subscription]]
sink = "self-mail"
watches = ["t"]
""",
        )

    write(first.port)
    admin.init(load_settings(config))
    daemon = Daemon(settings, config=config).start()
    try:
        daemon.wait_ready()
        db.execute("INSERT INTO t VALUES (1)")
        wait_for(lambda: len(first.messages()) == 1, "the first mail at the first server")

        write(second.port)
        mark = len(daemon.log())
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("configuration reloaded: ", mark)
        summary = daemon.log()[mark:]
        assert "restarted delivery for the changed settings" in summary, summary

        db.execute("INSERT INTO t VALUES (2)")
        wait_for(lambda: len(second.messages()) == 1, "the second mail at the new server")
        assert len(first.messages()) == 1

        mark = len(daemon.log())
        daemon.signal(signal.SIGHUP)  # nothing changed: no restart
        daemon.wait_log("configuration reloaded: ", mark)
        assert "restarted delivery" not in daemon.log()[mark:]
        status, _ = daemon.terminate_timed()
        assert status == 0, daemon.log()[-3000:]
    finally:
        log = daemon.log()
        daemon.close()
        first.stop()
        second.stop()
    assert "Traceback" not in log


# -- logs ---------------------------------------------------------------------------------------

SECRETS = {
    "dsn": "Pg-Secret-4711",
    "amqp": "Amqp-Secret-4712",
    "bearer": "Hook-Bearer-4713",
    "signing": "Hook-Signing-4714",
    "smtp": "Smtp-Secret-4715",
    "reload": "Reload-Secret-4716",
    "pgpassword": "Env-Secret-4717",
    "settings_smtp": "Smtp-Settings-4718",
}


def secret_config(settings: Settings, dsn: str, fmt: str, hook: str, smtp_port: int) -> str:
    return f"""
dsn = {toml_string(dsn)}
slot = {toml_string(settings.slot)}
log_level = "debug"
log_format = "{fmt}"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
starttls = true
username = "herald"
password = "{SECRETS["settings_smtp"]}"
from = "herald@example.com"

[[sink]]
name = "bus"
kind = "amqp"
[sink.options]
url = "amqp://guest:{SECRETS["amqp"]}@127.0.0.1:5672/"
exchange = "pgherald-test-secrets"

[[sink]]
name = "hook"
kind = "webhook"
[sink.options]
url = "{hook}"
secret = "{SECRETS["signing"]}"
headers = {{ Authorization = "Bearer {SECRETS["bearer"]}" }}

[[sink]]
name = "mail"
kind = "email"
[sink.options]
host = "127.0.0.1"
port = {smtp_port}
starttls = true
username = "herald"
password = "{SECRETS["smtp"]}"
from = "herald@example.com"
to = "ops@example.com"

[[sink]]
name = "self-mail"
kind = "email"
[sink.options]
smtp = "settings"
to = "me@example.com"

[[subscription]]
sink = "self-mail"
watches = ["t"]

[[subscription]]
sink = "bus"
watches = ["t"]

[[subscription]]
sink = "hook"
watches = ["t"]

[[subscription]]
sink = "mail"
watches = ["t"]
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_in_the_logs(db: Database, tmp_path: Path, fmt: str) -> None:
    """A daemon whose DSN, environment and sinks hold secrets goes through start, failing
    sinks (a broker refusing the password, a webhook answering 500, an SMTP server that is
    not there), refused reloads of files with other secrets, debug logging and a stop: no
    secret appears on its stderr, in either format."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    failing = Receiver(lambda key, body: Answer(status=500))
    settings = h.install(db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"))
    dsn = f"{db.dsn} password={SECRETS['dsn']}"
    config = tmp_path / "pgherald.toml"
    good = secret_config(settings, dsn, fmt, failing.url, free_port())
    config.write_text(good)
    admin.init(load_settings(config))
    daemon = Daemon(
        settings, "--shutdown-timeout", "20s", config=config,
        env={"PGPASSWORD": SECRETS["pgpassword"]},
    ).start()  # fmt: skip
    try:
        daemon.wait_ready()
        db.execute("INSERT INTO t SELECT generate_series(1, 3)")
        wait_for(lambda: failing.requests >= 3, "the webhook's failed attempts")
        daemon.wait_log("sink bus cannot start")  # the broker refused the password
        for mail in ("mail", "self-mail"):
            wait_for(
                lambda: d.delivery_statuses(settings, mail).get("failed", 0) > 0,  # noqa: B023
                f"a failed delivery to {mail}",
            )
        for bad in (
            good.replace("dsn = ", f'dsn = "host=elsewhere password={SECRETS["reload"]}"\n#'),
            good.replace('url = "amqp://', f'url = "ftp://u:{SECRETS["reload"]}@127.0.0.1/"\n#', 1),
            good + f'\nbogus = "{SECRETS["reload"]}"\n',
        ):
            config.write_text(bad)
            mark = len(daemon.log())
            daemon.signal(signal.SIGHUP)
            daemon.wait_log("configuration not reloaded", mark)
        config.write_text(good)
        status, _ = daemon.terminate_timed()
        assert status == 0, daemon.log()[-3000:]
    finally:
        log = daemon.log()
        daemon.close()
        failing.close()
    assert "starting" in log and "stopped" in log, log[-3000:]
    for name, secret in SECRETS.items():
        assert secret not in log, f"the {name} secret appears in the log"
    assert "Traceback" not in log
    if fmt == "json":
        records = json_lines(log)
        assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
        assert any(r["level"] == "debug" for r in records)
        assert any(r["level"] == "warning" and "bus" in r["message"] for r in records)
    else:
        assert log.splitlines()[0][:4].isdigit()  # text lines start with the time


def test_a_fatal_error_is_a_json_line_with_json_logs() -> None:
    result = cli(
        "run",
        "--log-format",
        "json",
        dsn=f"host=127.0.0.1 port={free_port()} user=me password={SECRETS['dsn']}",
    )
    assert result.returncode == 1, result.stderr
    [record] = json_lines(result.stderr)
    assert record["level"] == "error" and "connection refused" in record["message"]
    assert SECRETS["dsn"] not in result.stderr
