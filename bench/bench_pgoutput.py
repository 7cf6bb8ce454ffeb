"""How many pgoutput INSERT messages per second the decoder turns into dataclasses.

Decoding is the first step of logical capture for every row, so its rate bounds the
whole pipeline's. The rate depends on the machine and on what else runs on it, so the
script also measures, in the same run, a straightforward ``io.BytesIO`` decoder (the
way such a decoder is usually first written) and prints the ratio between the two.
Run: ``.venv/bin/python bench/bench_pgoutput.py [messages]``.
"""

from __future__ import annotations

import io
import statistics
import struct
import sys
import time
from collections.abc import Callable

from pgherald.events import UNCHANGED_TOAST
from pgherald.sources.pgoutput import Insert, Value, decode

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


def reference_decode(data: bytes) -> Insert:
    """The reference: reads an INSERT field by field from a stream."""
    stream = io.BytesIO(data)
    assert stream.read(1) == b"I"
    (oid,) = struct.unpack("!I", stream.read(4))
    assert stream.read(1) == b"N"
    (count,) = struct.unpack("!H", stream.read(2))
    values: list[Value] = []
    for _ in range(count):
        kind = stream.read(1)
        if kind == b"n":
            values.append(None)
        elif kind == b"u":
            values.append(UNCHANGED_TOAST)
        else:
            (length,) = struct.unpack("!I", stream.read(4))
            raw = stream.read(length)
            values.append(raw.decode() if kind == b"t" else raw)
    return Insert(None, oid, tuple(values))


def measure(decoder: Callable[[bytes], object], messages: list[bytes]) -> float:
    """Median messages/s over ``ROUNDS`` passes."""
    rates = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for message in messages:
            decoder(message)
        rates.append(len(messages) / (time.perf_counter() - started))
    return statistics.median(rates)


def main(count: int) -> None:
    messages = build_messages(count)
    for sample in (messages[0], messages[-1]):
        assert decode(sample) == reference_decode(sample)
    rate = measure(decode, messages)
    reference = measure(reference_decode, messages)
    print(
        f"pgoutput INSERT decode: {rate:,.0f} messages/s (median of {ROUNDS}, {count:,} messages)"
    )
    print(f"reference BytesIO decoder: {reference:,.0f} messages/s; ratio {rate / reference:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
