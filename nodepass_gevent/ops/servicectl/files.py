"""Files written so that a reader (systemd, a concurrent list) never sees half of one."""

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Readers (systemd, a concurrent list) see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, mode)
        os.replace(temp, str(path))
    except BaseException:
        os.unlink(temp)
        raise


def copy_atomically(source: Path, target: Path) -> None:
    """A running tunnel keeps reading the old file; a new one sees the old or the new."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=str(target.parent), prefix="." + target.name + ".")
    try:
        with os.fdopen(fd, "wb") as stream, source.open("rb") as original:
            shutil.copyfileobj(original, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, str(target))
    except BaseException:
        os.unlink(temp)
        raise


def remove_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # missing, or holds something that is not ours


def read_env_file(path: Path) -> Dict[str, str]:
    """KEY=VALUE lines, values optionally quoted, as systemd reads them (simple cases)."""
    values = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if not match:
            continue
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values
