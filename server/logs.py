"""Structured logs on stderr: one JSON object per line (or one plain-text line) with the `extra` fields of each
record.

At the default level (info), only embserve's own INFO records are written: the libraries underneath (fbgemm's
"Feature Gates", torchrec's quantization notes) log INFO chatter, some of it through the root logger, that says
nothing an operator can act on; their warnings and errors still show. `--log-level debug` shows everything.
"""

from __future__ import annotations

import json
import logging
import time

__all__ = ["configure_logging"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
OWN_LOGGERS = "embserve"


def _extra(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extra(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message> key=value ...`: the same fields as the JSON lines."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extra(record).items())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class _OwnInfoOnly(logging.Filter):
    """Lets through embserve's records, and other libraries' records of WARNING and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN_LOGGERS or record.name.startswith(OWN_LOGGERS + ".")
        return own or record.levelno >= logging.WARNING


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Logs to stderr as JSON lines (`fmt="json"`) or plain text; below `debug`, other libraries' INFO is dropped."""
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    if level.lower() != "debug":
        handler.addFilter(_OwnInfoOnly())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # torch.fx warns about its own tracing helpers whenever torchrec's modules are built; not actionable here.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
