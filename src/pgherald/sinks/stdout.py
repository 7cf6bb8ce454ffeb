"""The stdout sink: each event as one JSON line, for pipes (``| jq``) and for trying things.

Writing to a pipe whose reader went away is a permanent failure of the batch (nobody will
read it), anything else of the operating system a retryable one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from pgherald.errors import PermanentSinkError, RetryableSinkError
from pgherald.sinks.base import Message, Options, Outcome, SinkConfig


class StdoutSink:
    def __init__(self, name: str, stream: TextIO | None = None, strictly_ordered: bool = False):
        self.name = name
        self.stream = stream
        self.strictly_ordered = strictly_ordered

    async def start(self) -> None:
        return None

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        out = self.stream or sys.stdout
        try:
            out.write("".join(m.body.decode("utf-8") + "\n" for m in batch))
            out.flush()
        except BrokenPipeError:
            return [PermanentSinkError("stdout is closed")] * len(batch)
        except OSError as e:
            return [RetryableSinkError(f"cannot write to stdout: {e}")] * len(batch)
        return [None] * len(batch)

    async def close(self) -> None:
        return None


def from_config(config: SinkConfig) -> StdoutSink:
    Options(config.name, "stdout", config.options).check_unknown()
    return StdoutSink(config.name, strictly_ordered=config.strictly_ordered)
