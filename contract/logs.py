"""Logs on stderr: text for people, or one JSON object per line for log shippers (the worker's
--log-format). In JSON mode the final `error: ...` line of a failed run is an object too."""

from __future__ import annotations

import json
import logging
import sys
import time

_json_instance: str | None = None  # set while JSON logging is on: the instance every object names


class JsonFormatter(logging.Formatter):
    """One object per line: time (ISO 8601, UTC), ts (epoch seconds), level, logger, instance, message[, exc]."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "instance": self.instance,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str, instance: str) -> None:
    """Configure the root logger once for the process. Python warnings and the transformers library's
    messages go through it too, its progress bars are off (in JSON mode, every line on stderr is an
    object); kafka-python's own logs are silenced, since its failures reach the worker as exceptions."""
    from transformers.utils import logging as transformers_logging

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(instance))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [" + instance.replace("%", "%%") + "]: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    global _json_instance
    _json_instance = instance if fmt == "json" else None
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.captureWarnings(True)
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()  # bars are for terminals, not logs


def error_line(message: str) -> str:
    """The one line a failed run ends with: `error: ...`, or in JSON mode an object like every other line."""
    if _json_instance is None:
        return f"error: {message}"
    record = logging.LogRecord("error", logging.ERROR, __file__, 0, message, None, None)
    return JsonFormatter(_json_instance).format(record)
