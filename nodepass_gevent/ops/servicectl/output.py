"""How nodepass-service answers: its exit status, one-line errors, its output."""

import enum
import sys

PROG = "nodepass-service"


class Status(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2


class ServiceError(Exception):
    """A one-line message for the operator and the exit status that goes with it."""

    def __init__(self, message: str, status: Status = Status.FAILED) -> None:
        super().__init__(message)
        self.status = status


def say(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print("{}: warning: {}".format(PROG, message), file=sys.stderr, flush=True)
