"""Settings: the order of the sources, the checks on each value, and DSN redaction."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgherald.config import Settings, WatchSpec, load_settings, redacted_dsn
from pgherald.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "pgherald.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_any_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    assert settings == Settings()
    assert (settings.schema, settings.slot, settings.publication) == (
        "pgherald",
        "pgherald",
        "pgherald",
    )
    assert settings.dsn == ""
    assert settings.method == "auto"
    assert settings.config_file is None


def test_sources_in_priority_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        'dsn = "dbname=from_file"\nschema = "file_schema"\nslot = "file_slot"\n'
        'publication = "file_pub"\nbatch_size = 10\n',
        "other.toml",
    )
    env = {"PGHERALD_SCHEMA": "env_schema", "PGHERALD_SLOT": "env_slot", "PGHERALD_DSN": ""}
    settings = load_settings(path, env=env, schema="flag_schema", dsn=None)
    assert settings.schema == "flag_schema"  # flag beats env and file
    assert settings.slot == "env_slot"  # env beats file
    assert settings.publication == "file_pub"  # file beats defaults
    assert settings.dsn == "dbname=from_file"  # an empty variable and a None flag are unset
    assert settings.batch_size == 10
    assert settings.config_file == path


def test_config_file_from_env_and_from_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'schema = "cwd"\n')
    elsewhere = write(tmp_path, 'schema = "env_file"\n', "elsewhere.toml")
    assert load_settings(env={}).schema == "cwd"
    assert load_settings(env={"PGHERALD_CONFIG": str(elsewhere)}).schema == "env_file"
    assert load_settings(elsewhere, env={"PGHERALD_CONFIG": "/nonexistent"}).schema == "env_file"


def test_every_scalar_setting_has_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {
        "PGHERALD_DSN": "postgresql://u@h/db",
        "PGHERALD_SCHEMA": "s",
        "PGHERALD_SLOT": "sl",
        "PGHERALD_PUBLICATION": "p",
        "PGHERALD_METHOD": "snapshot",
        "PGHERALD_BATCH_SIZE": "7",
        "PGHERALD_BATCH_INTERVAL": "1.5",
        "PGHERALD_LOG_LEVEL": "DEBUG",
        "PGHERALD_DELIVERY_CONNECTIONS": "4",
    }
    settings = load_settings(env=env)
    assert settings == Settings(
        dsn="postgresql://u@h/db",
        schema="s",
        slot="sl",
        publication="p",
        method="snapshot",
        batch_size=7,
        batch_interval=1.5,
        log_level="debug",
        delivery_connections=4,
    )


def test_watches_declared_in_toml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[watch]]
table = "public.employees"
ignore_columns = ["updated_at"]

[[watch]]
table = '"My Schema"."Grants"'
name = "grants"
method = "snapshot"
columns = ["id", "amount"]
key = ["id"]
replica_identity_full = true
snapshot = true
""",
    )
    settings = load_settings(path, env={})
    assert settings.watches == (
        WatchSpec(table="public.employees", ignore_columns=("updated_at",)),
        WatchSpec(
            table='"My Schema"."Grants"',
            name="grants",
            method="snapshot",
            columns=("id", "amount"),
            key=("id",),
            replica_identity_full=True,
            snapshot=True,
        ),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('shema = "x"\n', "unknown key 'shema'"),
        ('[[watch]]\ntable = "t"\ncolums = ["a"]\n', "unknown key 'colums'"),
        ("[[watch]]\ncolumns = ['a']\n", "needs table"),
        ('[[watch]]\ntable = "t"\nkey = [1]\n', "key must be a list"),
        ('[[watch]]\ntable = "t"\ncolumns = "a,b"\n', "columns must be a list"),
        ('[[watch]]\ntable = "t"\nmethod = "magic"\n', "must be one of auto, logical, trigger"),
        ('[[watch]]\ntable = "t"\nsnapshot = "yes"\n', "snapshot must be true or false"),
        ('watch = "t"\n', "array of tables"),
        ("batch_size = 0\n", "at least 1"),
        ('batch_size = "many"\n', "whole number"),
        ("batch_size = true\n", "whole number"),
        ("batch_interval = -1\n", "between 0 and 3600"),
        ("delivery_connections = 0\n", "delivery_connections must be at least 1"),
        ('log_level = "loud"\n', "must be one of debug"),
        ("schema = 5\n", "must be a string"),
        ('schema = ""\n', "must not be empty"),
        (f'slot = "{"x" * 64}"\n', "63-byte"),
        ('method = "listen"\n', "must be one of"),
        ("schema = \n", "not valid TOML"),
    ],
)
def test_bad_toml_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(path, env={})
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_bad_environment_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="PGHERALD_BATCH_SIZE must be a whole number"):
        load_settings(env={"PGHERALD_BATCH_SIZE": "ten"})


def test_unrelated_pgherald_variables_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(env={"PGHERALD_SOMETHING_ELSE": "x"}) == Settings()


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        Settings().with_overrides(colour="blue")


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db port=5432 user=me password=s3cr3t-word dbname=app",
        "postgresql://me:s3cr3t-word@db:5432/app",
        "postgresql://me:s3cr3t-word@db/app?sslmode=require&sslpassword=s3cr3t-word",
        "host=db password='s3cr3t word with spaces'",
    ],
)
def test_redacted_dsn_hides_passwords(dsn: str) -> None:
    shown = redacted_dsn(dsn)
    assert "s3cr3t" not in shown
    assert "***" in shown
    assert "db" in shown
    assert Settings(dsn=dsn).redacted_dsn() == shown


def test_redacted_dsn_never_echoes_an_unparsable_dsn() -> None:
    # libpq's parse error would quote the text after the mistake: here, part of the password
    assert redacted_dsn("host=db password=abc secretpart") == "(unparsable connection string)"
    assert redacted_dsn("") == "(libpq defaults)"


def test_unparsable_dsn_error_does_not_quote_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid libpq connection string") as info:
        load_settings(env={"PGHERALD_DSN": "host=db password=abc secretpart"}, dsn=None)
    assert "secretpart" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        Settings().with_overrides(dsn="host=db password=abc secretpart")
    assert "secretpart" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[sink]]\nkind = "amqp"\n', 'needs name = "..."'),
        ('[[sink]]\nname = "a"\nkind = "amqp"\nretries = 3\n', "unknown key 'retries'"),
        ('[[sink]]\nname = "a"\nkind = "amqp"\nmax_attempts = 0\n', "at least 1"),
        ('[[sink]]\nname = "a"\nkind = "amqp"\noptions = 3\n', "[sink.options]"),
        ('[[subscription]]\nsink = "a"\n', "watches must be a list"),
        ('[[subscription]]\nsink = "a"\nwatches = ["w"]\nwhere = 1\n', "a condition"),
        ('sink = "a"\n', "array of tables ([[sink]])"),
    ],
)
def test_bad_sinks_and_subscriptions_in_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pgherald.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path, env={})
