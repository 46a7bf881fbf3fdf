"""Five-level logging (debug, info, warn, error, fatal) on standard output.

Every line carries a timestamp and its level, as NodePass's own logger does:

    2026-11-24 22:00:00.123 INFO  Tunnel signal -> //4321#1 sent to 127.0.0.1:50012
"""

import logging
import sys

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

log = logging.getLogger(LOGGER_NAME)


class TunnelLog(logging.LoggerAdapter):
    """The logger one tunnel writes through: "<name>: " before each message
    when the process runs several tunnels; a lone tunnel's lines are unchanged."""

    def __init__(self, name: str = "") -> None:
        super().__init__(log, {})
        self.tunnel = name
        self._prefix = name + ": " if name else ""  # names never hold "%" (tunnelset.py)

    def process(self, msg, kwargs):
        return (self._prefix + msg if self._prefix else msg), kwargs


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%d %H:%M:%S")
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        return "%s.%03d %-5s %s" % (stamp, record.msecs, level, record.getMessage())


def setup(level_name: str = "info", stream=None) -> None:
    """Send the tunnel's log to ``stream`` (stdout) at the named level."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(LEVELS[level_name])
    log.propagate = False
