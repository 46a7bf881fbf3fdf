"""Host figures for the master's /info, read from Linux's /proc as v1.14 does.

Each reader gives 0 where the file is missing (not Linux, a container that
hides it): /info still answers.
"""

import os
import platform
import time

import gevent

ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "i386": "386",
          "armv7l": "arm", "armv6l": "arm"}


def _read(path: str) -> str:
    try:
        with open(path, "r") as stream:
            return stream.read()
    except OSError:
        return ""


def memory() -> dict:
    values = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            values[name] = int(words[0]) * 1024
    total = values.get("MemTotal", 0)
    swap = values.get("SwapTotal", 0)
    return {"mem_total": total, "mem_used": total - values.get("MemAvailable", total),
            "swap_total": swap, "swap_used": swap - values.get("SwapFree", swap)}


def network() -> dict:
    received = sent = 0
    for line in _read("/proc/net/dev").splitlines()[2:]:
        name, _, rest = line.partition(":")
        words = rest.split()
        if name.strip() == "lo" or len(words) < 9:
            continue
        received += int(words[0])
        sent += int(words[8])
    return {"netrx": received, "nettx": sent}


def disks() -> dict:
    read = written = 0
    for line in _read("/proc/diskstats").splitlines():
        words = line.split()
        if len(words) < 10 or words[2].startswith(("loop", "ram", "dm-")):
            continue
        read += int(words[5]) * 512
        written += int(words[9]) * 512
    return {"diskr": read, "diskw": written}


def _cpu_times():
    words = (_read("/proc/stat").splitlines() or [""])[0].split()[1:]
    numbers = [int(word) for word in words if word.isdigit()]
    idle = sum(numbers[3:5]) if len(numbers) >= 5 else 0
    return sum(numbers), idle


def cpu_percent() -> int:
    """The whole host's CPU use over 100 ms, in percent (v1.14 samples alike)."""
    total, idle = _cpu_times()
    gevent.sleep(0.1)
    total_after, idle_after = _cpu_times()
    spent = total_after - total
    if spent <= 0:
        return 0
    return int(round(100.0 * (spent - (idle_after - idle)) / spent))


def uptime() -> int:
    words = _read("/proc/uptime").split()
    return int(float(words[0])) if words else 0


def figures(started: float) -> dict:
    result = {"os": platform.system().lower(),
              "arch": ARCHES.get(platform.machine(), platform.machine()),
              "cpu": cpu_percent(), "sysup": uptime(),
              "uptime": int(time.monotonic() - started)}
    for reader in (memory, network, disks):
        result.update(reader())
    return result


def hostname() -> str:
    return os.uname().nodename
