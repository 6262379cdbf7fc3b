"""The daemon's log: text or JSON lines on stderr, with its workers' lines in it.

Each worker writes its log records to its stdout/stderr pipe as JSON lines (child.py installs WireFormatter);
the daemon reads the pipe (pump_worker_output) and hands each record to its own logging, tagged with the pool
and worker pid, so journald or a log shipper sees one stream in one format. A line that is not such a record
(a crash in native code, click's last words) is passed on as it is, as a line of logger `registry.worker`.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone
from typing import IO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(origin)s %(message)s"


def iso_time(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ pool and worker_pid for a worker's line,
    + exc with the traceback when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": iso_time(record.created), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        for key in ("pool", "worker_pid"):
            if getattr(record, key, None) is not None:
                line[key] = getattr(record, key)
        exc = getattr(record, "exc", None) or (self.formatException(record.exc_info) if record.exc_info else None)
        if exc:
            line["exc"] = exc
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        pool = getattr(record, "pool", None)
        record.origin = f" [{pool}/{record.worker_pid}]" if pool is not None else ""
        text = super().format(record)
        exc = getattr(record, "exc", None)
        return f"{text}\n{exc}" if exc and not record.exc_info else text


class WireFormatter(logging.Formatter):
    """A worker's records on its pipe to the daemon: JSON with the event's own time (`ts`)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": record.created, "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


_handler: logging.Handler | None = None


def setup(log_format: str, debug: bool = False, stream: IO[str] | None = None) -> None:
    """The daemon's handler on the root logger: registry at INFO (DEBUG with --debug), libraries at WARNING."""
    global _handler
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler(stream or sys.stderr)
        for old in list(root.handlers):  # --debug's basicConfig: one handler, in our format
            root.removeHandler(old)
        root.addHandler(_handler)
    set_format(log_format)
    logging.captureWarnings(True)  # a library's warning is a log line too, not a stray line in another format
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("registry").setLevel(logging.DEBUG if debug else logging.INFO)


def set_format(log_format: str) -> None:
    if _handler is not None:
        _handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())


def emit_worker_line(line: str, pool: str, pid: int) -> None:
    """One line a worker wrote, as a record of the daemon's log."""
    line = line.rstrip("\n")
    if not line.strip():
        return
    record = None
    if line.startswith("{"):
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if isinstance(data, dict) and {"ts", "level", "logger", "message"} <= data.keys():
            level = logging.getLevelName(str(data["level"]))  # "INFO" -> 20
            record = logging.makeLogRecord({
                "name": str(data["logger"]), "levelname": str(data["level"]),
                "levelno": level if isinstance(level, int) else logging.INFO,
                "msg": str(data["message"]), "created": float(data["ts"]), "exc": data.get("exc")})
            record.msecs = (record.created - int(record.created)) * 1000
    if record is None:  # not a log record: print it as it came, marked as the worker's
        level = logging.ERROR if line.startswith(("error:", "Traceback", "Fatal Python error")) else logging.INFO
        record = logging.makeLogRecord({"name": "registry.worker", "levelname": logging.getLevelName(level),
                                        "levelno": level, "msg": line})
    record.pool, record.worker_pid = pool, pid
    logging.getLogger(record.name).handle(record)


def pump_worker_output(pipe: IO[bytes], pool: str, pid: int) -> threading.Thread:
    """A thread that re-emits every line of a worker's output until the worker closes its end."""
    def pump() -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                try:
                    emit_worker_line(raw.decode("utf-8", "replace"), pool, pid)
                except Exception:  # noqa: BLE001 - a log line must never stop the pump (the pipe would fill)
                    pass
    thread = threading.Thread(target=pump, daemon=True, name=f"log-{pool}-{pid}")
    thread.start()
    return thread
