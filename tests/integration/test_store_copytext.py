"""The change log's own COPY text writer, checked against what the server reads back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgherald.store import copytext
from tests.conftest import Database

texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]))


def test_any_text_and_text_array_survive_copy(db_primary: Database) -> None:
    with db_primary.connect() as conn:
        conn.execute(b"CREATE TABLE c (t text, a text[], n bigint, b boolean, at timestamptz)")

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(
            st.lists(
                st.tuples(
                    st.none() | texts,
                    st.none() | st.lists(st.none() | texts, max_size=5),
                    st.none() | st.integers(-(2**63), 2**63 - 1),
                    st.booleans(),
                    st.none()
                    | st.datetimes(
                        min_value=datetime(1, 1, 2),
                        max_value=datetime(9999, 12, 30),
                        timezones=st.sampled_from(
                            [UTC, timezone(timedelta(hours=-5, minutes=-30))]
                        ),
                    ),
                ),
                max_size=5,
            )
        )
        def roundtrip(
            rows: list[
                tuple[str | None, list[str | None] | None, int | None, bool, datetime | None]
            ],
        ) -> None:
            conn.execute(b"TRUNCATE c")
            with conn.cursor() as cur, cur.copy(b"COPY c (t, a, n, b, at) FROM STDIN") as copy:
                for t, a, n, b, at in rows:
                    line = "\t".join(
                        (
                            copytext.text(t),
                            copytext.text_array(a),
                            copytext.integer(n),
                            copytext.boolean(b),
                            copytext.timestamptz(at),
                        )
                    )
                    copy.write(line + "\n")
            got = conn.execute(b"SELECT t, a, n, b, at FROM c").fetchall()
            assert got == rows

        roundtrip()


def test_any_text_array_survives_as_a_parameter(db_primary: Database) -> None:
    """``array_literal``: the field rows of direct updates go to the server as parameters."""
    with db_primary.connect() as conn:

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(st.lists(st.none() | texts, max_size=6))
        def roundtrip(values: list[str | None]) -> None:
            row = conn.execute(b"SELECT %s::text[]", (copytext.array_literal(values),)).fetchone()
            assert row is not None and row[0] == values

        roundtrip()
