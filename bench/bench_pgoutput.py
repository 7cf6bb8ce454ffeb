"""How many pgoutput INSERT messages per second the decoder turns into dataclasses.

Decoding is the first step of logical capture for every row, so its rate bounds the
whole pipeline's. Run: ``.venv/bin/python bench/bench_pgoutput.py [messages]``.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time

from pgherald.sources.pgoutput import Insert, decode

ROUNDS = 5


def _text(value: str | None) -> bytes:
    if value is None:
        return b"n"
    raw = value.encode()
    return b"t" + struct.pack("!I", len(raw)) + raw


def build_messages(count: int) -> list[bytes]:
    """``count`` distinct INSERTs of a 6-column row: int, text, numeric, timestamptz, bool, NULL."""
    messages = []
    for i in range(count):
        columns = (
            str(i),
            f"customer-{i % 997}@example.com",
            f"{i % 100000}.{i % 100:02d}",
            "2024-05-17 12:34:56.123456+00",
            "t" if i % 2 else "f",
            None,
        )
        messages.append(
            b"I"
            + struct.pack("!I", 16384)
            + b"N"
            + struct.pack("!H", len(columns))
            + b"".join(_text(c) for c in columns)
        )
    return messages


def run(count: int) -> float:
    messages = build_messages(count)
    check = decode(messages[-1])
    assert isinstance(check, Insert) and check.new[0] == str(count - 1), check
    rates = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for message in messages:
            decode(message)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rate = run(n)
    print(f"pgoutput INSERT decode: {rate:,.0f} messages/s (median of {ROUNDS}, {n:,} messages)")
