"""The processes the bench starts, each in its own process group so that
stopping it stops its children too, and what /proc says about them (CPU, memory).
"""

import os
import signal
import socket
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .base import BenchError, HOST, STOP_TIMEOUT, say


# --------------------------------------------------------------------------
# Processes: everything the bench starts is stopped by pid on the way out.


class Processes:
    """Every process the bench starts, each logging to its own file in workdir."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.running: List[subprocess.Popen] = []
        self.logs: Dict[int, str] = {}
        self.count = 0

    def start(
        self, name: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None
    ) -> subprocess.Popen:
        self.count += 1
        log_path = os.path.join(self.workdir, "%03d-%s.log" % (self.count, name))
        with open(log_path, "wb") as log:
            # A session of its own, so that stop() reaches the children too
            # (socat's forked relays, nginx's workers) by this one pid.
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.running.append(proc)
        self.logs[proc.pid] = log_path
        return proc

    def stop(self, proc: subprocess.Popen) -> Optional[int]:
        """SIGTERM the process group, SIGKILL it after STOP_TIMEOUT; return the exit status."""
        if proc in self.running:
            self.running.remove(proc)
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        _kill_group_members(proc.pid)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                say("could not stop pid %d: %s" % (proc.pid, exc))

    def log_tail(self, proc: subprocess.Popen, lines: int = 15) -> str:
        try:
            with open(self.logs[proc.pid], "rb") as log:
                text = log.read().decode("utf-8", "replace")
        except (KeyError, OSError):
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pgid: int, signum: int) -> None:
    """Signal the group of a leader that has not been reaped yet (so the pgid is still ours)."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group_members(pgid: int) -> None:
    """SIGKILL, by pid, the members of a process group that outlived their leader
    (a socat relay still copying). While a member exists the group id cannot be
    given to anyone else, so every pid found here is one the bench started."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(proc_stat_fields(int(entry))[2]) == pgid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    procs: Sequence[subprocess.Popen] = (),
    interval: float = 0.1,
) -> None:
    """Retry check() until it returns True; give up at the deadline or when a process dies."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise BenchError(
                    "%s: pid %d exited with status %s" % (what, proc.pid, proc.returncode)
                )
        try:
            if check():
                return
        except (OSError, BenchError, ValueError, subprocess.SubprocessError) as exc:
            last_error = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            raise BenchError("%s: not ready after %.0f s (%s)" % (what, timeout, last_error))
        time.sleep(interval)


def free_port(with_udp: bool = False) -> int:
    """A port the OS just gave out (and, if asked, free for UDP too)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            if not with_udp:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise BenchError("no free port for TCP and UDP")


def free_ports(count: int) -> List[int]:
    """count distinct ports the OS just gave out (all held at once, so none repeats)."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def is_listening(port: int) -> bool:
    """Whether some socket listens on TCP port (read from /proc, so no connection is made)."""
    wanted = ":%04X " % port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                for line in lines:
                    fields = line.split()
                    if len(fields) > 3 and (fields[1] + " ").endswith(wanted) and fields[3] == "0A":
                        return True
        except OSError:
            continue
    return False


# --------------------------------------------------------------------------
# /proc readers: memory and CPU of the tunnel processes.

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat_fields(pid: int) -> List[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    with open("/proc/%d/stat" % pid) as stat:
        return stat.read().rsplit(")", 1)[1].split()


def proc_children(pid: int) -> List[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(proc_stat_fields(int(entry))[1]) == pid:
                    children.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return children


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of pid and of its children, live or already reaped."""
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> Tuple[float, float]:
    """(user, system) CPU seconds of pid and of its children, live or already reaped."""
    user = system = 0.0
    for member in [pid] + proc_children(pid):
        try:
            fields = proc_stat_fields(member)
        except OSError:
            continue  # exited between the listing and the read; the parent counts it
        # utime, stime, then cutime, cstime: the reaped children's share of each.
        user += (int(fields[11]) + int(fields[13])) / CLOCK_TICKS
        system += (int(fields[12]) + int(fields[14])) / CLOCK_TICKS
    return user, system


def proc_rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_tree_pss_kb(pid: int) -> int:
    """Proportional set size of pid and its children: a fair sum for forked processes."""
    total = 0
    for member in [pid] + proc_children(pid):
        try:
            with open("/proc/%d/smaps_rollup" % member) as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total
