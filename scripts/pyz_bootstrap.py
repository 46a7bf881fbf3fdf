# The __main__.py of nodepass.pyz, written into the zip by scripts/build-pyz.
#
# This file must parse and run on any Python from 2.7 on, far enough to say in
# one line what the pyz needs: an operator on an old host types
# `python nodepass.pyz` and may get Python 2.7. So: no f-strings, no
# keyword-only arguments, no `raise ... from`, no print() with file=, no
# annotations, and nothing newer than 3.6 once the version check has passed.
#
# The zip holds one copy of each distinct wheel, unpacked (minus test suites)
# under wheels/<wheel file name>/, and nodepass-pyz.json, which names the
# wheel sets: one per Python ABI (cp36m, cp38, ...), and a second one for an
# ABI where the project's markers single out a later patch release (cp39 from
# 3.9.0, cp39-3.9.2 from 3.9.2). At start this picks this Python's set,
# unpacks it once into <cache>/<build>/<set>/ (compiled extension modules
# cannot be imported from a zip), puts that directory first on sys.path and
# runs the nodepass command line.
#
# Cache: $NODEPASS_PYZ_CACHE, else $XDG_CACHE_HOME/nodepass-gevent, else
# $HOME/.cache/nodepass-gevent. When none of these can be used (HOME unset,
# empty or unwritable, as for a service user) it falls back, with one line on
# stderr, to a private directory under the system's temporary directory.
#
# Started without -S, it runs itself again with -S: what it imports comes from
# the pyz only, never from the host's site-packages, whose .pth files could
# otherwise load an older zope or gevent before the pyz's are on the path.
#
# Two instances starting at once each unpack into their own temporary
# directory beside the target and rename it into place; rename is atomic, so
# the target is either absent or complete. The loser of the race deletes its
# copy and uses the winner's.

import errno
import json
import os
import platform
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zipfile

MANIFEST = "nodepass-pyz.json"
WHEELS = "wheels/"
COMPLETE = ".nodepass-pyz-complete"  # written last, inside the directory, before the rename
CACHE_NAME = "nodepass-gevent"
MIN_GLIBC = (2, 17)  # manylinux2014
EXIT_UNSUPPORTED = 2
EXIT_FAILED = 1


def say(message):
    sys.stderr.write("nodepass.pyz: %s\n" % message)
    sys.stderr.flush()


def archive_path():
    """The pyz itself: __main__.py sits at the top of the zip."""
    return os.path.dirname(os.path.abspath(__file__))


def read_manifest(archive):
    with zipfile.ZipFile(archive) as pyz:
        return json.loads(pyz.read(MANIFEST).decode("utf-8"))


# -- is this a host the pyz carries wheels for? -----------------------------------

def python_abi():
    """The wheel ABI tag of this interpreter: cp36m, cp38, cp313t, ..."""
    if sys.version_info < (3, 0):
        return "cp%d%d" % sys.version_info[:2]
    return "cp%d%d%s" % (sys.version_info[0], sys.version_info[1], sys.abiflags)


def glibc_version():
    """(major, minor) of the C library if it is glibc, else None (musl, other OS)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        text = None  # Python 2 does not know the name
    if not text:
        try:
            library, version = platform.libc_ver()
        except (IOError, OSError):
            return None
        text = "%s %s" % (library, version) if library == "glibc" else ""
    if not text.startswith("glibc "):
        return None
    try:
        return tuple(int(part) for part in text.split()[1].split(".")[:2])
    except (IndexError, ValueError):
        return None


def describe_host(glibc):
    machine = os.uname()[4] if hasattr(os, "uname") else platform.machine()
    bits = struct.calcsize("P") * 8
    system = "Linux" if sys.platform.startswith("linux") else sys.platform
    host = "%s %s%s" % (system, machine,
                        "" if bits == 64 else " (%d-bit Python)" % bits)
    if glibc:
        host += " with glibc %d.%d" % glibc
    elif sys.platform.startswith("linux"):
        host += " without glibc"
    return "%s %s (ABI %s) on %s" % (platform.python_implementation(),
                                     platform.python_version(), python_abi(), host)


def wheel_set(manifest):
    """The name of the set for this Python: its ABI's, from the latest release <= this one."""
    abi, running = python_abi(), tuple(sys.version_info[:3])
    best = None
    for name, entry in manifest["sets"].items():
        since = tuple(int(part) for part in entry["since"].split("."))
        if entry["abi"] == abi and since <= running and (best is None or since > best[0]):
            best = (since, name)
    return best[1] if best else None


def unsupported(manifest):
    """Why this host cannot run the pyz, as one line; None when it can."""
    glibc = glibc_version()
    supported = (getattr(sys, "implementation", None) is not None
                 and sys.implementation.name == "cpython"
                 and wheel_set(manifest) is not None
                 and sys.platform.startswith("linux")
                 and os.uname()[4] == "x86_64" and struct.calcsize("P") == 8
                 and glibc is not None and glibc >= MIN_GLIBC)
    if supported:
        return None
    return ("nodepass.pyz needs CPython %s on x86_64 Linux with glibc %d.%d or newer; "
            "this is %s" % (manifest["pythons"], MIN_GLIBC[0], MIN_GLIBC[1],
                            describe_host(glibc)))


# -- where to unpack ---------------------------------------------------------------

def configured_cache_root():
    """(the cache root the environment asks for, None) or (None, why there is none)."""
    explicit = os.environ.get("NODEPASS_PYZ_CACHE")
    if explicit:
        return explicit, None
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative one
        return os.path.join(xdg, CACHE_NAME), None
    home = os.environ.get("HOME")
    if home is None:
        return None, "HOME is not set"
    if not os.path.isabs(home):
        return None, "HOME is %s" % ("empty" if not home else "not an absolute path")
    return os.path.join(home, ".cache", CACHE_NAME), None


def private_temp_root():
    """A temporary directory only this user can write: shared by this user's runs."""
    path = os.path.join(tempfile.gettempdir(), "%s-%d" % (CACHE_NAME, os.getuid()))
    try:
        os.mkdir(path, 0o700)
    except OSError as error:
        if error.errno != errno.EEXIST:
            raise
    info = os.lstat(path)
    if (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & 0o077):
        return path
    # Someone else made it, or made it open to others: use one of our own.
    return tempfile.mkdtemp(prefix=CACHE_NAME + "-")


# -- unpacking ---------------------------------------------------------------------

def is_complete(directory, stamp):
    try:
        with open(os.path.join(directory, COMPLETE)) as marker:
            return marker.read() == stamp
    except (IOError, OSError):
        return False


def unpack_into(directory, archive, wheels, stamp):
    """Write the files of these wheels into directory, then the completion marker."""
    prefixes = tuple(WHEELS + name + "/" for name in wheels)
    count = 0
    with zipfile.ZipFile(archive) as pyz:
        for entry in pyz.infolist():
            if entry.filename.endswith("/") or not entry.filename.startswith(prefixes):
                continue
            relative = entry.filename.split("/", 2)[2]
            if relative.startswith("/") or ".." in relative.split("/"):
                raise OSError(errno.EINVAL, "unsafe path in the pyz", entry.filename)
            target = os.path.join(directory, relative)
            parent = os.path.dirname(target)
            if not os.path.isdir(parent):
                os.makedirs(parent)
            with pyz.open(entry) as source, open(target, "wb") as output:
                shutil.copyfileobj(source, output, 1 << 20)
            count += 1
    if count == 0:
        raise OSError(errno.ENOENT, "the pyz holds none of the files it lists", archive)
    with open(os.path.join(directory, COMPLETE), "w") as marker:
        marker.write(stamp)


def ready_directory(root, archive, manifest, name):
    """<root>/<build>/<set name>, unpacked and complete; OSError when that cannot be."""
    stamp = "%s %s\n" % (manifest["build"], name)
    parent = os.path.join(root, manifest["build"])
    target = os.path.join(parent, name)
    if is_complete(target, stamp):
        return target
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, 0o700)
        except OSError as error:
            if error.errno != errno.EEXIST:  # another instance made it first
                raise
    staging = tempfile.mkdtemp(prefix="." + name + ".unpacking-", dir=parent)
    try:
        unpack_into(staging, archive, manifest["sets"][name]["wheels"], stamp)
        os.chmod(staging, 0o755)
        for _ in range(3):
            try:
                os.rename(staging, target)
                return target
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if is_complete(target, stamp):
                return target  # another instance won the race: use its copy
            set_aside(target)  # left by something that was not us: no marker
        raise OSError(errno.EBUSY, "could not put the unpacked files in place", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def set_aside(directory):
    doomed = tempfile.mkdtemp(prefix=".stale-", dir=os.path.dirname(directory))
    try:
        os.rename(directory, os.path.join(doomed, "old"))
    except OSError:
        pass  # gone already, or someone else moved it
    shutil.rmtree(doomed, ignore_errors=True)


def unpacked(archive, manifest, name):
    """The directory to import from: in the cache if possible, else in a temporary one."""
    root, reason = configured_cache_root()
    if root is not None:
        try:
            return ready_directory(root, archive, manifest, name)
        except OSError as error:
            reason = "cannot write %s (%s)" % (root, error.strerror or error)
    fallback = private_temp_root()
    say("%s; unpacking into %s instead" % (reason, fallback))
    return ready_directory(fallback, archive, manifest, name)


# -- entry -------------------------------------------------------------------------

def without_site(archive):
    """Run this pyz again under `python -S`, with the same interpreter options."""
    if sys.flags.no_site or not sys.executable:
        return
    try:
        options = subprocess._args_from_interpreter_flags()  # -u, -O, -X ...: kept
    except AttributeError:
        options = []
    argv = [sys.executable] + options + ["-S", archive] + sys.argv[1:]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def main():
    archive = archive_path()
    try:
        manifest = read_manifest(archive)
    except (IOError, OSError, KeyError, ValueError, zipfile.BadZipfile) as error:
        say("error: cannot read %s from %s: %s" % (MANIFEST, archive, error))
        return EXIT_FAILED
    reason = unsupported(manifest)
    if reason:
        sys.stderr.write(reason + "\n")
        return EXIT_UNSUPPORTED
    without_site(archive)
    name = wheel_set(manifest)
    try:
        directory = unpacked(archive, manifest, name)
    except (OSError, zipfile.BadZipfile) as error:
        say("error: cannot unpack the %s files: %s" % (name, error))
        return EXIT_FAILED
    # Only what was unpacked is imported: the zip itself leaves the path.
    sys.path[:] = [directory] + [entry for entry in sys.path
                                 if os.path.abspath(entry or ".") != archive]
    from nodepass_gevent.cli import run
    return run()


if __name__ == "__main__":
    sys.exit(main())
