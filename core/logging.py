"""Logging for the service processes: text for people, or one JSON object per line.

Each JSON line has ``ts``, ``level``, ``logger`` and ``message``, plus ``job_id`` and ``tenant``
while they are known (set with :func:`log_context`; context variables, so threads and asyncio
tasks keep their own), and ``exc`` with the traceback of an exception.

The format comes from ``configure_logging(json=…)`` or, when not given, ``DISTILL_LOG_FORMAT``
(``json`` | ``text``; default ``json`` in production, ``text`` otherwise); the level from
``DISTILL_LOG_LEVEL`` (default ``INFO``).
"""

from __future__ import annotations

import atexit
import json as jsonlib
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, TextIO

CONTEXT_FIELDS = ("job_id", "tenant")
_EMPTY: dict[str, str] = {}
_context: ContextVar[dict[str, str]] = ContextVar("distill_log_context", default=_EMPTY)  # noqa: B039

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"
# Servers that configure their own loggers; under JSON their lines go through the root handler.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task")


@contextmanager
def log_context(**values: str | None) -> Iterator[None]:
    """Add ``job_id``/``tenant`` (or other keys) to every log line inside the block."""
    token = open_context(**values)
    try:
        yield
    finally:
        _context.reset(token)


def open_context(**values: str | None) -> Token[dict[str, str]]:
    """Start a log context without a ``with`` block; end it with :func:`close_context`."""
    current = dict(_context.get())
    current.update({k: str(v) for k, v in values.items() if v is not None})
    return _context.set(current)


def close_context(token: Token[dict[str, str]]) -> None:
    _context.reset(token)


def bind_log_context(**values: str | None) -> None:
    """Add keys to the innermost open log context (no effect outside one: nothing leaks)."""
    current = _context.get()
    if current is not _EMPTY:
        current.update({k: str(v) for k, v in values.items() if v is not None})


class ContextFilter(logging.Filter):
    """Copies the log context onto each record (``record.context``: text; attributes: JSON)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        for key, value in context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        record.context = "".join(f" [{k}={v}]" for k, v in context.items())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (+ job_id, tenant, exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in (*CONTEXT_FIELDS, *_context.get()):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return jsonlib.dumps(entry, default=str)


def wants_json() -> bool:
    """The format chosen by the environment (DISTILL_LOG_FORMAT, else by DISTILL_ENVIRONMENT)."""
    fmt = os.environ.get("DISTILL_LOG_FORMAT", "").strip().lower()
    if fmt in ("json", "text"):
        return fmt == "json"
    return os.environ.get("DISTILL_ENVIRONMENT", "").strip().lower() == "production"


def make_formatter(json: bool) -> logging.Formatter:
    return JsonFormatter() if json else logging.Formatter(TEXT_FORMAT)


def configure_logging(
    json: bool | None = None, level: str | int | None = None, *, background: bool = False
) -> None:
    """Send every log record to stderr in one format (replacing the root's handlers).

    Under JSON, the server loggers (uvicorn, celery) lose their own handlers and propagate to
    the root, so that every line of the process is JSON. ``background``: the logging thread only
    formats the record; a thread of its own writes the lines (an API's event loop must not wait
    on a slow disk: it serves every other request meanwhile). Not for processes that fork.
    """
    global _writer
    json = wants_json() if json is None else json
    level = level or os.environ.get("DISTILL_LOG_LEVEL", "INFO").upper()
    flush_logging()  # a writer of an earlier configuration
    handler: logging.Handler
    if background:
        _writer = LineWriter(sys.stderr)
        handler = BufferedLineHandler(_writer)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(json))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_distill", False):
            root.removeHandler(old)
    handler._distill = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    if json:
        for name in SERVER_LOGGERS:
            server = logging.getLogger(name)
            server.handlers = []
            server.propagate = True


def flush_logging() -> None:
    """Write every line still held by a ``background`` configuration (and stop its thread)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


class LineWriter:
    """Writes the lines handed to it to a stream from a thread of its own, every few
    milliseconds all that came meanwhile in one write.

    A thread woken for each line costs a context switch and a turn of the GIL per line: under
    load, more CPU than the line itself.
    """

    interval_seconds = 0.05

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: deque[str] = deque()  # appends and pops are atomic: no lock
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def add(self, line: str) -> None:
        self._lines.append(line)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_seconds):
            self._write()
        self._write()

    def _write(self) -> None:
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        if lines:
            with suppress(Exception):  # nowhere to report a broken stderr
                self.stream.write("".join(lines))
                self.stream.flush()


class BufferedLineHandler(logging.Handler):
    """Formats a record where it is logged (the log context lives there); a LineWriter
    writes it."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.add(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


_writer: LineWriter | None = None
atexit.register(flush_logging)


def format_root_handlers(json: bool | None = None) -> None:
    """Give the root logger's existing handlers our format and context (for servers such as
    Celery that install their own handlers)."""
    json = wants_json() if json is None else json
    for handler in logging.getLogger().handlers:
        handler.setFormatter(make_formatter(json))
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
