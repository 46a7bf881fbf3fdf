"""Start nodepass processes by fork, hundreds of times a minute.

`python -m nodepass_gevent URL` spends about 0.3 s of CPU importing gevent,
cryptography and the package before it dials anything; 300 restarts would be
90 s of imports alone. This launcher imports all that once (after gevent's
monkey patching, as the real entry point does) and forks a child per start;
each child is a process of its own (its own pid, hub, sockets), runs
`cli.run([URL])` exactly as the console script does, and is killed by pid like
any other. Only the imports are shared.

Commands, one per line on stdin; one answer line on stdout each:

    start LOG_PATH URL   -> the child's pid (its stdout and stderr go to LOG_PATH)
    wait PID             -> its exit status (negative: killed by that signal)
    quit                 -> (no answer) exit after killing any child still running

Run as `python storm_launcher.py`; the children inherit its environment.
"""

import os
import signal
import sys

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402

from nodepass_gevent import cli, service  # noqa: E402,F401
from nodepass_gevent.copy import tls  # noqa: E402,F401
from nodepass_gevent.ops import debug  # noqa: E402,F401
from nodepass_gevent.tunnel import client, server  # noqa: E402,F401

# The parent never runs the gevent hub: the plain functions, not gevent's.
fork = monkey.get_original("os", "fork")
waitpid = monkey.get_original("os", "waitpid")


def start(log_path: str, url: str) -> int:
    pid = fork()
    if pid:
        return pid
    try:  # the child: never returns to the command loop
        gevent.reinit()
        devnull = os.open(os.devnull, os.O_RDONLY)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        sys.argv = ["nodepass", url]
        status = cli.run([url])
    except BaseException:  # noqa: B902 - whatever happens, the child must not go on
        import traceback
        traceback.print_exc()
        status = 70
    sys.stdout.flush()
    os._exit(int(status))


def exit_status(pid: int) -> int:
    _, status = waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main() -> None:
    children = set()
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        command, _, rest = line.strip().partition(" ")
        if command == "start":
            log_path, _, url = rest.partition(" ")
            pid = start(log_path, url)
            children.add(pid)
            answer = pid
        elif command == "wait":
            pid = int(rest)
            answer = exit_status(pid)
            children.discard(pid)
        elif command == "quit":
            break
        else:
            answer = "error: unknown command %r" % command
        sys.stdout.write("%s\n" % answer)
        sys.stdout.flush()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            exit_status(pid)
        except OSError:
            pass


if __name__ == "__main__":
    main()
