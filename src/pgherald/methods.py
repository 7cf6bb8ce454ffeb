"""Choosing a capture method for ``method = "auto"``, with reasons a person can check.

Logical capture needs ``wal_level = logical``, a role that may open a replication
connection (REPLICATION or superuser) and a free replication slot; trigger capture needs
only the right to put triggers on the table. ``auto`` takes logical when all of its needs
are met, else trigger, and ``pgherald doctor`` prints the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg

_FACTS: Final = """
SELECT current_setting('wal_level'),
       r.rolsuper OR r.rolreplication,
       current_user,
       current_setting('max_replication_slots')::int,
       (SELECT count(*) FROM pg_replication_slots)::int,
       EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = %s)
FROM pg_roles r WHERE r.rolname = current_user
"""


@dataclass(frozen=True)
class MethodChoice:
    method: str
    reasons: tuple[str, ...]

    def explain(self) -> str:
        return f"auto picks {self.method} capture: " + "; ".join(self.reasons)


def choose_method(conn: psycopg.Connection[Any], slot: str) -> MethodChoice:
    """Logical when this server and role allow it (slot ``slot`` existing or creatable)."""
    row = conn.execute(_FACTS, (slot,)).fetchone()
    assert row is not None
    wal_level, may_replicate, user, max_slots, used_slots, slot_exists = row
    missing: list[str] = []
    if wal_level != "logical":
        missing.append(f"wal_level is {wal_level!r}, not 'logical'")
    if not may_replicate:
        missing.append(f"role {user!r} has neither REPLICATION nor superuser")
    if not slot_exists and used_slots >= max_slots:
        missing.append(
            f"no free replication slot (max_replication_slots = {max_slots}, {used_slots} in use)"
        )
    if missing:
        return MethodChoice("trigger", tuple(missing))
    return MethodChoice(
        "logical",
        (
            "wal_level is 'logical'",
            f"role {user!r} may replicate",
            f"replication slot {slot!r} exists" if slot_exists else "a replication slot is free",
        ),
    )
