"""Store functions inside a caller's psycopg pipeline (as routing and delivery use them): the
store's schema is entered and left with single statements, the caller's search path comes
back, and an error still surfaces as the store's own."""

from __future__ import annotations

import psycopg
import pytest

from pgherald import admin
from pgherald.config import Settings
from pgherald.errors import SchemaError
from pgherald.store import checkpoints, deliveries
from tests.conftest import Database


def test_store_functions_ride_in_a_pipeline_and_the_path_comes_back(db: Database) -> None:
    settings = Settings(dsn=db.dsn)
    admin.init(settings)
    with psycopg.connect(db.dsn) as conn:
        conn.execute("SET search_path TO public")
        with conn.pipeline():
            checkpoints.save_checkpoint(conn, "pgherald", "router", "42")
            assert deliveries.list_subscriptions(conn, "pgherald") == []
            assert checkpoints.load_checkpoint(conn, "pgherald", "router") == "42"
            path = conn.execute("SHOW search_path").fetchone()
            conn.commit()
        assert path == ("public",)
    with psycopg.connect(db.dsn) as conn:
        assert checkpoints.load_checkpoint(conn, "pgherald", "router") == "42"


def test_an_error_in_a_pipeline_is_the_stores_own(db: Database) -> None:
    with (
        psycopg.connect(db.dsn) as conn,
        pytest.raises(SchemaError, match="pgherald init"),
        conn.pipeline(),
    ):
        checkpoints.load_checkpoint(conn, "not_installed", "router")
