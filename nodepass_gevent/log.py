"""Five-level logging (debug, info, warn, error, fatal) on standard output.

Every line carries a timestamp and its level, as NodePass's own logger does:

    2026-11-24 22:00:00.123 INFO  Tunnel signal -> //4321#1 sent to 127.0.0.1:50012

With log_format=json (a URL parameter, or NODEPASS_LOG_FORMAT=json) each line
is one JSON object instead, for a log shipper (journald, Loki, Elasticsearch):

    {"time": "2026-11-24T22:00:00.123+01:00", "level": "info", "tunnel": "web",
     "message": "Tunnel signal -> //4321#1 sent to 127.0.0.1:50012"}

("tunnel" only on the lines of a named tunnel; one object per line, never wrapped.)
"""

import json
import logging
import sys
import time

LOGGER_NAME = "nodepass"
FATAL = logging.CRITICAL
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "fatal": FATAL,
}
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN",
                logging.ERROR: "ERROR", FATAL: "FATAL"}
TEXT, JSON = "text", "json"
FORMATS = (TEXT, JSON)

log = logging.getLogger(LOGGER_NAME)


class TunnelLog(logging.LoggerAdapter):
    """The logger one tunnel writes through: "<name>: " before each message
    when the process runs several tunnels; a lone tunnel's lines are unchanged.
    Its records also carry the name (``record.tunnel``), which the JSON format
    gives a field of its own instead of the prefix."""

    def __init__(self, name: str = "") -> None:
        super().__init__(log, {"tunnel": name})
        self.tunnel = name
        self._prefix = name + ": " if name else ""  # names never hold "%" (tunnelset.py)

    def process(self, msg, kwargs):
        kwargs["extra"] = self.extra
        return (self._prefix + msg if self._prefix else msg), kwargs


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%d %H:%M:%S")
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        return "%s.%03d %-5s %s" % (stamp, record.msecs, level, record.getMessage())


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: time (local, RFC 3339 with milliseconds and the
    UTC offset), level (as log= spells it), tunnel (when the line has one), message."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"time": _rfc3339(record.created), "level": _level_word(record.levelno)}
        message, tunnel = record.getMessage(), getattr(record, "tunnel", "")
        if tunnel:
            fields["tunnel"] = tunnel
            message = message[len(tunnel) + 2:] if message.startswith(tunnel + ": ") else message
        fields["message"] = message
        # ensure_ascii: a message with any byte in it stays one line of plain ASCII.
        return json.dumps(fields, ensure_ascii=True)


def _level_word(levelno: int) -> str:
    return _LEVEL_NAMES.get(levelno, logging.getLevelName(levelno)).lower()


def _rfc3339(created: float) -> str:
    local = time.localtime(created)
    offset = time.strftime("%z", local)  # +0100
    return "%s.%03d%s:%s" % (time.strftime("%Y-%m-%dT%H:%M:%S", local),
                             int(created * 1000) % 1000, offset[:3], offset[3:])


def setup(level_name: str = "info", stream=None, log_format: str = TEXT) -> None:
    """Send the tunnel's log to ``stream`` (stdout) at the named level, as text
    lines (the default) or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_JsonFormatter() if log_format == JSON else _Formatter())
    log.handlers[:] = [handler]
    log.setLevel(LEVELS[level_name])
    log.propagate = False
