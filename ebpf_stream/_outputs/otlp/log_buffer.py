"""The engine's own warnings and errors, held to go out as OTLP logs.

A deployment that watches the Collector sees why samples went missing (a
probe that failed, a full queue) next to the data, without reading the
host's stderr.  The records wait here, bounded, until the next export sends
them with its batch.
"""

from __future__ import annotations

import collections
import logging

_LOG_BUFFER = 256  # engine log records held between exports; older ones are dropped


class LogBuffer(logging.Handler):
    """Keeps the engine's warnings and errors until the next export sends them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[logging.LogRecord] = collections.deque(
            maxlen=_LOG_BUFFER)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        records = list(self.records)
        self.records.clear()
        return records
