"""scripts/build-pyz: one nodepass.pyz for CPython 3.6 to 3.14, and tunnels between them.

The pyz is built once for the module. Then for each pair of the matrix a
server runs from it under one Python and a client from the same file under
another (every version once on each side, 3.6 with 3.13 both ways), always as
`python -S` (no site-packages: what runs comes from the pyz) with HOME a fresh
empty directory, so nothing installed on this machine can help. Through each
pair: a 4 MB echo, 50 concurrent connections and UDP.

Also: Python 2.7 and other platforms get one line and exit status 2; instances
started at once with a fresh cache all work; with no usable HOME the pyz falls
back to a private temporary directory and says so.

A Python of the matrix that is missing fails the tests that need it: the
matrix is the point of this module.
"""

import concurrent.futures
import functools
import glob
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from support import (FAST_ENV, HOST, ChildProcess, EchoServer, echo_works, free_port, sha256,
                     stop_all, tcp_exchange, udp_exchange, wait_until)

REPO = Path(__file__).resolve().parent.parent
BUILD_PYZ = REPO / "scripts" / "build-pyz"
MATRIX = ("3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
# The pyz also carries 3.14's wheels; no 3.14 interpreter here to run them on.
BUILT_FOR = MATRIX + ("3.14",)
# versions[i] serves versions[-1 - i]: each version once on each side.
PAIRS = [(MATRIX[i], MATRIX[-1 - i]) for i in range(len(MATRIX))]
ABIS = {"3.6": "cp36m", "3.7": "cp37m"}  # the others: cp38, cp39, ...
CONCURRENT = 50

pytestmark = pytest.mark.timeout(300)


def abi_of(version: str) -> str:
    return ABIS.get(version, "cp" + version.replace(".", ""))


@functools.lru_cache(maxsize=None)
def full_version(python: str) -> tuple:
    result = subprocess.run([python, "-S", "-c", "import sys; print('%d %d %d' % sys.version_info[:3])"],
                            stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
    return tuple(int(part) for part in result.stdout.split())


def set_for(manifest: Dict[str, object], version: str) -> str:
    """The wheel set the pyz picks for the matrix's VERSION (what the bootstrap does)."""
    running = full_version(interpreter(version))
    candidates = [(tuple(int(p) for p in entry["since"].split(".")), name)
                  for name, entry in manifest["sets"].items()
                  if entry["abi"] == abi_of(version)]
    return max(candidate for candidate in candidates if candidate[0] <= running)[1]


def pyenv_root() -> Path:
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    try:
        result = subprocess.run(["pyenv", "root"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
        if result.returncode == 0 and result.stdout.strip():
            return Path(result.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return Path("/root/.pyenv")


def interpreter(version: str) -> str:
    """The matrix's CPython VERSION; a missing one fails the test, it is not skipped."""
    pattern = str(pyenv_root() / "versions" / (version + ".*") / "bin" / "python")
    found = sorted(glob.glob(pattern))
    if not found:
        pytest.fail("Python {} of the test matrix is missing: nothing matches {}"
                    .format(version, pattern), pytrace=False)
    return found[-1]


def clean_env(**changes: Optional[str]) -> Dict[str, str]:
    """This environment minus whatever could point the pyz elsewhere, plus changes."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "NODEPASS_PYZ_CACHE", "XDG_CACHE_HOME")}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_pyz(python: str, pyz: Path, args: List[str], env: Dict[str, str],
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-S", str(pyz)] + args, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def start_pyz(python: str, pyz: Path, url: str, env: Dict[str, str]) -> ChildProcess:
    """`PYTHON -S nodepass.pyz URL` (not `-m nodepass_gevent`), in exactly ``env``."""
    return ChildProcess([python, "-S", str(pyz), url], env, name=url)


# -- the build -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(pyz_build):
    """(path of the pyz, what build-pyz printed), built once for the whole matrix."""
    return pyz_build


@pytest.fixture(scope="module")
def pyz(built) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def manifest(pyz) -> Dict[str, object]:
    with zipfile.ZipFile(str(pyz)) as archive:
        return json.loads(archive.read("nodepass-pyz.json").decode())


@pytest.fixture(scope="module")
def empty_home(tmp_path_factory) -> Path:
    """HOME for the pairs: empty at first; the pyz caches under its .cache."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def warm(pyz, empty_home):
    """Every Python of the matrix runs the pyz once, all at the same time.

    Eight ABIs unpack side by side into one build directory; afterwards the
    pairs below start without unpacking. A missing Python fails here (and in
    every pair that needs it).
    """
    env = clean_env(HOME=str(empty_home))
    with concurrent.futures.ThreadPoolExecutor(len(MATRIX)) as pool:
        results = dict(zip(MATRIX, pool.map(
            lambda version: run_pyz(interpreter(version), pyz, ["--version"], env), MATRIX)))
    for version, result in results.items():
        assert result.returncode == 0 and "nodepass-gevent" in result.stdout, \
            "Python {}: {}{}".format(version, result.stdout, result.stderr)
        assert result.stderr == "", "Python {}: {}".format(version, result.stderr)
    return env


def test_pyz_is_one_file_for_every_python(built, manifest):
    pyz, printed = built
    with open(str(pyz), "rb") as archive:
        assert archive.readline() == b"#!/usr/bin/env python3\n"
    assert os.access(str(pyz), os.X_OK)
    assert {entry["abi"] for entry in manifest["sets"].values()} == {abi_of(v) for v in BUILT_FOR}
    for version in BUILT_FOR:  # every ABI has a set from its first release on
        assert {"abi": abi_of(version), "since": version + ".0"} in [
            {"abi": entry["abi"], "since": entry["since"]} for entry in manifest["sets"].values()]
    assert manifest["pythons"] == "3.6 to 3.14"
    with zipfile.ZipFile(str(pyz)) as archive:
        names = archive.namelist()
    stored = {name.split("/")[1] for name in names if name.startswith("wheels/")}
    listed = {wheel for entry in manifest["sets"].values() for wheel in entry["wheels"]}
    assert stored == listed  # each wheel once, however many ABIs share it
    # The project's own wheel is pure Python: stored once, in every set.
    project = [w for w in listed if w.startswith("nodepass_gevent-")]
    assert len(project) == 1 and project[0].endswith("-py3-none-any.whl")
    assert all(project[0] in entry["wheels"] for entry in manifest["sets"].values())
    # Each set has its binary parts for its own ABI only.
    for entry in manifest["sets"].values():
        gevent = [w for w in entry["wheels"] if w.startswith("gevent-")]
        assert len(gevent) == 1 and "-{}-manylinux".format(entry["abi"]) in gevent[0]
    assert not [n for n in names if "/gevent/tests/" in n or n.endswith(".exe")]
    if shutil.which("strip"):  # the builder strips debug sections when binutils is there
        with zipfile.ZipFile(str(pyz)) as archive:
            greenlets = [n for n in names if "/greenlet/_greenlet." in n and n.endswith(".so")]
            assert greenlets and all(b".debug_info" not in archive.read(n) for n in greenlets)
    for name in manifest["sets"]:
        assert "  {:6} from ".format(name) in printed  # the versions per set
    assert "size by project" in printed


def test_a_python_3_14_gets_the_cp314_wheels(pyz, manifest):
    """What the bootstrap picks for a CPython 3.14 (asked of its own wheel_set, this
    Python pretending to be 3.14): a set whose binary wheels are built for cp314."""
    script = ("import runpy, sys\n"
              "bootstrap = runpy.run_path({!r}, run_name='bootstrap')\n"  # main() not run
              "manifest = bootstrap['read_manifest']({!r})\n"
              "sys.version_info, sys.abiflags = (3, 14, 0, 'final', 0), ''\n"
              "print(bootstrap['wheel_set'](manifest), bootstrap['unsupported'](manifest))\n"
              ).format(str(pyz), str(pyz))
    result = subprocess.run([sys.executable, "-S", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    chosen, refusal = result.stdout.split()
    assert chosen == "cp314" and refusal == "None"
    wheels = manifest["sets"]["cp314"]["wheels"]
    for project in ("gevent-", "greenlet-"):
        found = [w for w in wheels if w.startswith(project)]
        assert len(found) == 1 and "-cp314-cp314-manylinux" in found[0], wheels


@pytest.mark.parametrize("server_version, client_version", PAIRS,
                         ids=["server%s-client%s" % pair for pair in PAIRS])
def test_tunnel_between_two_pythons(pyz, manifest, warm, empty_home, server_version,
                                    client_version):
    server_python, client_python = interpreter(server_version), interpreter(client_version)
    env = dict(warm, **FAST_ENV)
    echo = EchoServer()
    processes = []
    try:
        tunnel_port, user_port = free_port(), free_port()
        server = start_pyz(server_python, pyz, "server://%s:%d/%s:%d?log=debug&tls=1" % (
            HOST, tunnel_port, HOST, user_port), env)
        processes.append(server)
        client = start_pyz(client_python, pyz, "client://%s:%d/%s:%d?log=debug" % (
            HOST, tunnel_port, HOST, echo.port), env)
        processes.append(client)
        try:
            wait_until(lambda: echo_works(user_port), 30, interval=0.2,
                       what="traffic through the tunnel")
            check_traffic(user_port)
        except AssertionError as error:
            raise AssertionError("%s\nserver log:\n%s\nclient log:\n%s" % (
                error, server.output()[-3000:], client.output()[-3000:])) from None
        # The Python each was meant to be, from the cache.
        for process, python in ((server, server_python), (client, client_python)):
            assert process.executable() == os.path.realpath(python)
        for version in (server_version, client_version):
            assert (empty_home / ".cache" / "nodepass-gevent" / manifest["build"]
                    / set_for(manifest, version) / "nodepass_gevent" / "cli.py").exists()
        assert server.stop() == 0 and client.stop() == 0
    finally:
        stop_all(processes)
        echo.close()


def check_traffic(port: int) -> None:
    payload = os.urandom(4 << 20)
    assert sha256(tcp_exchange(port, payload, timeout=60)) == sha256(payload), "4 MB echo"

    payloads = [os.urandom(16 * 1024) for _ in range(CONCURRENT)]
    start_together = threading.Barrier(CONCURRENT)

    def exchange(data: bytes) -> bytes:
        start_together.wait(30)
        return tcp_exchange(port, data, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(CONCURRENT) as pool:
        echoed = list(pool.map(exchange, payloads))
    assert sum(e == p for e, p in zip(echoed, payloads)) == CONCURRENT, "concurrent connections"

    # The first datagram may arrive before the UDP flow is set up: retry it.
    wait_until(lambda: udp_works(port, b"first"), 15, interval=0.2, what="UDP through the tunnel")
    for size in (1, 1200, 8000):
        datagram = os.urandom(size)
        assert udp_exchange(port, datagram) == datagram, "UDP datagram of %d bytes" % size


def udp_works(port: int, payload: bytes) -> bool:
    try:
        return udp_exchange(port, payload, timeout=1) == payload
    except OSError:
        return False


# -- hosts the pyz refuses ----------------------------------------------------------

def one_line_refusal(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nodepass.pyz needs CPython 3.6 to 3.14 on x86_64 Linux "
                               "with glibc 2.17 or newer; this is ")
    return lines[0]


@pytest.mark.parametrize("args", [["--version"], ["server://127.0.0.1:10101/127.0.0.1:8080"]])
def test_python_2_7_gets_one_line_and_exit_2(pyz, tmp_path, args):
    result = subprocess.run([interpreter("2.7"), str(pyz)] + args,
                            env=clean_env(HOME=str(tmp_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    line = one_line_refusal(result)
    assert "this is CPython 2.7.18 (ABI cp27) on Linux x86_64" in line
    assert list(tmp_path.iterdir()) == []  # nothing unpacked


# Run the pyz in an interpreter whose view of the host was changed first:
# the bootstrap asks os and sys each time, so this is what it would see there.
PRETEND = {
    "aarch64": "os.uname = lambda: ('Linux', 'h', '5.10', '#1', 'aarch64')",
    "old glibc": "os.confstr = lambda name: 'glibc 2.12'",
    "musl": ("os.confstr = lambda name: None\n"
             "import platform; platform.libc_ver = lambda *a, **k: ('', '')"),
    "macOS": "sys.platform = 'darwin'",
}


@pytest.mark.parametrize("host, expected", [
    ("aarch64", "on Linux aarch64 with glibc"),
    ("old glibc", "on Linux x86_64 with glibc 2.12"),
    ("musl", "on Linux x86_64 without glibc"),
    ("macOS", "on darwin x86_64"),
])
def test_another_platform_gets_one_line_and_exit_2(pyz, tmp_path, host, expected):
    script = ("import os, runpy, sys\n{}\nsys.argv = [{!r}, '--version']\n"
              "runpy.run_path({!r}, run_name='__main__')\n").format(PRETEND[host], str(pyz),
                                                                   str(pyz))
    result = subprocess.run([sys.executable, "-S", "-c", script],
                            env=clean_env(HOME=str(tmp_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert expected in one_line_refusal(result)
    assert list(tmp_path.iterdir()) == []


# -- the cache ----------------------------------------------------------------------

CHECK_URL = "server://127.0.0.1:10101/127.0.0.1:8080?tls=1"  # tls=1: cryptography makes a cert


def leftovers(build_dir: Path) -> List[str]:
    return sorted(p.name for p in build_dir.iterdir() if p.name.startswith("."))


def test_instances_started_at_once_share_a_fresh_cache(pyz, manifest, tmp_path):
    python = interpreter(MATRIX[-1])
    for round_number in range(2):  # two races, each with an empty cache
        cache = tmp_path / ("cache%d" % round_number)
        env = clean_env(HOME=str(tmp_path / "home"), NODEPASS_PYZ_CACHE=str(cache))
        starts = [subprocess.Popen([python, "-S", str(pyz), "--check", CHECK_URL], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True) for _ in range(3)]
        for process in starts:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0 and out.startswith("ok: server"), out + err
            assert err == ""
        build_dir = cache / manifest["build"]
        assert sorted(p.name for p in build_dir.iterdir()) == [set_for(manifest, MATRIX[-1])]
        assert (build_dir / set_for(manifest, MATRIX[-1]) / ".nodepass-pyz-complete").exists()


def test_a_cache_directory_without_its_marker_is_replaced(pyz, manifest, tmp_path):
    python = interpreter(MATRIX[-1])
    broken = tmp_path / "cache" / manifest["build"] / set_for(manifest, MATRIX[-1])
    (broken / "nodepass_gevent").mkdir(parents=True)
    (broken / "nodepass_gevent" / "__init__.py").write_text("raise SystemExit('stale')\n")
    env = clean_env(NODEPASS_PYZ_CACHE=str(tmp_path / "cache"))
    result = run_pyz(python, pyz, ["--version"], env)
    assert result.returncode == 0 and "nodepass-gevent" in result.stdout, result.stderr
    assert (broken / ".nodepass-pyz-complete").exists()
    assert leftovers(broken.parent) == []


@pytest.mark.parametrize("home, reason", [
    (None, "HOME is not set"),
    ("", "HOME is empty"),
    ("/proc", "cannot write /proc/.cache/nodepass-gevent"),  # unwritable, even for root
])
def test_without_a_usable_home_it_unpacks_into_a_private_temporary_dir(pyz, manifest, tmp_path,
                                                                       home, reason):
    version = MATRIX[0] if home is None else MATRIX[-1]
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = run_pyz(interpreter(version), pyz, ["--check", CHECK_URL],
                     clean_env(HOME=home, TMPDIR=str(temp)))
    assert result.returncode == 0 and result.stdout.startswith("ok: server"), result.stderr
    private = temp / ("nodepass-gevent-%d" % os.getuid())
    # One line from the pyz (the package may add its own, e.g. a deprecation warning).
    lines = [line for line in result.stderr.splitlines() if "nodepass.pyz" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("nodepass.pyz: " + reason)
    assert lines[0].endswith("; unpacking into {} instead".format(private))
    assert oct(private.stat().st_mode & 0o777) == "0o700"
    assert (private / manifest["build"] / set_for(manifest, version)
            / ".nodepass-pyz-complete").exists()


@pytest.mark.parametrize("version", [MATRIX[0], MATRIX[-1]])
def test_the_hosts_site_packages_cannot_shadow_the_pyz(pyz, tmp_path, version):
    """Started without -S, the pyz runs itself again with -S, before importing anything.

    A sitecustomize here stands for a host's .pth files: it plants a bogus
    docopt that the pyz's command line would import if site had run.
    """
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import sys, types\nsys.modules['docopt'] = types.ModuleType('docopt')\n")
    env = clean_env(HOME=str(tmp_path), PYTHONPATH=str(tmp_path / "site"))
    result = subprocess.run([interpreter(version), "-u", str(pyz), "--version"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=120)
    assert result.returncode == 0 and "nodepass-gevent" in result.stdout, result.stderr
    planted = subprocess.run([interpreter(version), "-c", "import docopt; print(docopt)"],
                             env=env, stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert "<module 'docopt'>" in planted.stdout  # the plant works where site runs


# -- the build's own checks ----------------------------------------------------------

@pytest.fixture(scope="module")
def builder():
    """scripts/build-pyz as a module, to feed its checks wheels it must refuse."""
    loader = importlib.machinery.SourceFileLoader("build_pyz", str(BUILD_PYZ))
    spec = importlib.util.spec_from_loader("build_pyz", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def fake_wheel(folder: Path, file_name: str, shared_object: bytes = b"") -> Path:
    path = folder / file_name
    with zipfile.ZipFile(str(path), "w") as archive:
        archive.writestr("pkg/__init__.py", "")
        if shared_object:
            archive.writestr("pkg/_native.cpython-38-x86_64-linux-gnu.so", shared_object)
    return path


@pytest.mark.parametrize("file_name, abi, refused", [
    ("pkg-1.0-cp38-cp38-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "cp38", None),
    ("pkg-1.0-cp36-cp36m-manylinux1_x86_64.whl", "cp36m", None),
    ("pkg-1.0-cp37-abi3-manylinux2010_x86_64.whl", "cp311", None),
    ("pkg-1.0-py3-none-any.whl", "cp313", None),
    ("pkg-1.0-cp311-cp311-manylinux_2_28_x86_64.whl", "cp311", "only manylinux2014"),
    ("pkg-1.0-cp311-cp311-musllinux_1_1_x86_64.whl", "cp311", "only manylinux2014"),
    ("pkg-1.0-cp311-cp311-linux_x86_64.whl", "cp311", "only manylinux2014"),
    ("pkg-1.0-cp38-cp38-manylinux2014_x86_64.whl", "cp39", "not cp39"),
])
def test_build_refuses_wheels_newer_than_manylinux2014(builder, tmp_path, file_name, abi,
                                                       refused):
    wheel = builder.parse_wheel(fake_wheel(tmp_path, file_name))
    if refused is None:
        builder.check_tags(wheel, abi)
    else:
        with pytest.raises(builder.BuildError, match=refused):
            builder.check_tags(wheel, abi)


def test_build_refuses_a_shared_object_that_needs_a_newer_glibc(builder, tmp_path):
    name = "pkg-1.0-cp38-cp38-manylinux2014_x86_64.whl"
    fine = builder.parse_wheel(fake_wheel(tmp_path, name, b"\0GLIBC_2.2.5\0GLIBC_2.17\0"))
    builder.check_glibc(fine)
    (tmp_path / "lying").mkdir()
    lying = builder.parse_wheel(fake_wheel(tmp_path / "lying", name, b"\0GLIBC_2.17\0GLIBC_2.28"))
    with pytest.raises(builder.BuildError, match="needs glibc 2.28"):
        builder.check_glibc(lying)


def test_build_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(BUILD_PYZ), "--pythons", "2.7"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "build-pyz: error: --pythons: '2.7' is not one of 3.6, 3.7, 3.8, 3.9, 3.10, 3.11, "
        "3.12, 3.13, 3.14"]
    unknown = subprocess.run([sys.executable, str(BUILD_PYZ), "--bogus"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1
