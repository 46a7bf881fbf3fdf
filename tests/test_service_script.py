"""scripts/nodepass-service against a temporary --root: files written, commands shown.

With --root the script never runs systemctl, useradd or userdel; it prints them.
The generated units are checked by `systemd-analyze verify --root`, which reads
them (and our drop-ins) from the temporary root without a running systemd.
"""

import glob
import http.client
import json
import os
import pty
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import List

import pytest

from nodepass_gevent.config import SETTINGS, ConfigError, load_settings
from support import find_python, make_test_ca

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "nodepass-service"
UNITS = Path("etc/systemd/system")
TEMPLATE = UNITS / "nodepass@.service"
CONFIG = Path("etc/nodepass")
VENV_BIN = Path("opt/nodepass-gevent/venv/bin")
SERVER_URL = "server://127.0.0.1:10101/127.0.0.1:8080?tls=1"
CLIENT_URL = "client://127.0.0.1:10101/127.0.0.1:22"
# Units systemd-analyze needs to find in the root before it accepts ours.
SYSTEM_TARGETS = ("sysinit.target", "basic.target", "multi-user.target", "network-online.target")


def service(root: Path, *args: str, python: str = sys.executable,
            timeout: float = 120) -> subprocess.CompletedProcess:
    # PYTHONPATH: the URL check falls back on `python -m nodepass_gevent`.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([python, str(SCRIPT), "--root", str(root)] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          universal_newlines=True, timeout=timeout, stdin=subprocess.DEVNULL)


def ok(root: Path, *args: str) -> str:
    result = service(root, *args)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def files_under(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def dropin(root: Path, name: str, file_name: str) -> Path:
    return root / UNITS / "nodepass@{}.service.d".format(name) / file_name


# -- create and the files it writes ------------------------------------------------

def test_help_names_every_command(tmp_path):
    out = ok(tmp_path, "--help")
    for command in ("install", "create", "start", "stop", "restart", "status", "list",
                    "delete", "update", "uninstall", "reload", "--config", "--root"):
        assert command in out


def test_no_command_off_a_terminal_is_a_usage_error(tmp_path):
    result = service(tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "nodepass-service: error:" in result.stderr


def test_create_writes_env_file_template_and_stop_timeout(tmp_path):
    out = ok(tmp_path, "create", "web", SERVER_URL, "--env", "SHUTDOWN_TIMEOUT=10s",
             "--env", "MIN_POOL_CAPACITY=32")
    env_file = tmp_path / CONFIG / "web.env"
    text = env_file.read_text()
    assert "NODEPASS_URL='{}'\n".format(SERVER_URL) in text
    assert "SHUTDOWN_TIMEOUT='10s'\n" in text and "MIN_POOL_CAPACITY='32'\n" in text
    assert "# SEMAPHORE_LIMIT=1024\n" in text  # defaults shown, not pinned
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    template = (tmp_path / TEMPLATE).read_text()
    for line in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "User=nodepass", "KillSignal=SIGTERM",
                 "EnvironmentFile=/etc/nodepass/%i.env",
                 "ExecStart=/opt/nodepass-gevent/venv/bin/nodepass ${NODEPASS_URL}",
                 "AmbientCapabilities=\n"):
        assert line in template
    assert dropin(tmp_path, "web", "stop.conf").read_text() == \
        "[Service]\nTimeoutStopSec=15s\n"
    assert not dropin(tmp_path, "web", "bind.conf").exists()
    # Nothing really ran, and the dry run says what would have.
    assert "--root given, not running: useradd --system" in out
    assert "--root given, not running: systemctl daemon-reload" in out
    # Atomic writes leave no temporary files behind.
    assert not [f for f in files_under(tmp_path) if os.path.basename(f).startswith(".")]


@pytest.mark.parametrize("shutdown, stop_timeout", [
    (None, "10s"), ("3s", "8s"), ("1m30s", "95s"), ("500ms", "5500ms"), ("1h", "3605s"),
])
def test_stop_timeout_is_shutdown_timeout_plus_margin(tmp_path, shutdown, stop_timeout):
    extra = ["--env", "SHUTDOWN_TIMEOUT=" + shutdown] if shutdown else []
    ok(tmp_path, "create", "t", CLIENT_URL, *extra)
    assert "TimeoutStopSec={}\n".format(stop_timeout) in \
        dropin(tmp_path, "t", "stop.conf").read_text()


@pytest.mark.parametrize("text", ["1.5h", "1m30s", "500ms", ".5s", "+2s", "1h0m0.5s",
                                  "-1s", "0", "0s", "1d", "5", "1m 30s", "1.5.2s"])
def test_shutdown_timeout_is_read_as_the_tunnel_reads_it(tmp_path, text):
    """One Go-duration parser: the script takes what config.parse_duration takes
    (above zero, as load_settings wants) and derives the stop timeout from it."""
    try:
        seconds = load_settings({"SHUTDOWN_TIMEOUT": text}).shutdown_timeout
    except ConfigError:
        seconds = None
    result = service(tmp_path, "create", "t", CLIENT_URL, "--env", "SHUTDOWN_TIMEOUT=" + text)
    if seconds is None:
        assert result.returncode == 2 and "SHUTDOWN_TIMEOUT must be a duration" in result.stderr
        assert not (tmp_path / CONFIG / "t.env").exists()
        return
    assert result.returncode == 0, result.stderr
    milliseconds = int(round(seconds * 1000)) + 5000
    expected = "{}s".format(milliseconds // 1000) if milliseconds % 1000 == 0 \
        else "{}ms".format(milliseconds)
    assert dropin(tmp_path, "t", "stop.conf").read_text() == \
        "[Service]\nTimeoutStopSec={}\n".format(expected)


def test_env_file_lists_every_setting_of_the_package_with_its_default(tmp_path):
    ok(tmp_path, "create", "t", CLIENT_URL, "--env", "REPORT_INTERVAL=2s")
    text = (tmp_path / CONFIG / "t.env").read_text()
    for setting in SETTINGS:
        line = "REPORT_INTERVAL='2s'" if setting.name == "REPORT_INTERVAL" else \
            "# {}={}".format(setting.name, setting.default)
        assert line + "\n" in text


def test_the_log_format_variable_goes_into_the_environment_file(tmp_path):
    text = ok(tmp_path, "create", "t", CLIENT_URL) and (tmp_path / CONFIG / "t.env").read_text()
    assert "# NODEPASS_LOG_FORMAT=text\n" in text
    ok(tmp_path, "create", "--force", "t", CLIENT_URL, "--env", "NODEPASS_LOG_FORMAT=json")
    assert "NODEPASS_LOG_FORMAT='json'\n" in (tmp_path / CONFIG / "t.env").read_text()
    result = service(tmp_path, "create", "--force", "t", CLIENT_URL, "--env",
                     "NODEPASS_LOG_FORMAT=xml")
    assert result.returncode == 2 and result.stderr.strip() == \
        "nodepass-service: error: NODEPASS_LOG_FORMAT must be one of text, json, got 'xml'"
    assert "NODEPASS_LOG_FORMAT='json'\n" in (tmp_path / CONFIG / "t.env").read_text()


@pytest.mark.parametrize("url, privileged", [
    ("server://:443/127.0.0.1:8080", True),          # tunnel port
    ("server://127.0.0.1:10101/127.0.0.1:80", True),  # target port, where users arrive
    ("server://127.0.0.1:10101/127.0.0.1:8080?data_port=993", True),  # the data port
    ("server://[::1]:1023/[::1]:8080", True),
    ("server://:1024/127.0.0.1:8080", False),
    ("client://127.0.0.1:443/127.0.0.1:22", False),  # a client only dials out
])
def test_bind_capability_only_for_a_server_below_1024(tmp_path, url, privileged):
    ok(tmp_path, "create", "t", url)
    bind = dropin(tmp_path, "t", "bind.conf")
    assert bind.exists() == privileged
    if privileged:
        assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in bind.read_text()
    # The shared template never grants it.
    template = (tmp_path / TEMPLATE).read_text()
    assert "AmbientCapabilities=\n" in template and "AmbientCapabilities=CAP" not in template


@pytest.mark.parametrize("args, message", [
    (["create", "a/b", CLIENT_URL], "bad tunnel name"),
    (["create", "a b", CLIENT_URL], "bad tunnel name"),
    (["create", "x" * 65, CLIENT_URL], "bad tunnel name"),
    (["create", "t", "ftp://127.0.0.1:1/127.0.0.1:2"], "URL refused"),
    (["create", "t", "server://127.0.0.1/127.0.0.1:2"], "URL refused"),
    (["create", "t", "server://127.0.0.1:1/127.0.0.1:2?tls=2&crt=/nonexistent.pem&key=/x"],
     "URL refused"),
    (["create", "t", "client://127.0.0.1:1/127.0.0.1:2?x='"], "quotes"),
    (["create", "t", CLIENT_URL, "--env", "NOT_A_VARIABLE=1"], "unknown variable"),
    (["create", "t", CLIENT_URL, "--env", "SEMAPHORE_LIMIT=-1"], "positive integer"),
    (["create", "t", CLIENT_URL, "--env", "SHUTDOWN_TIMEOUT=5 s"], "duration"),
    (["create", "t", CLIENT_URL, "--env", "SHUTDOWN_TIMEOUT"], "KEY=VALUE"),
    (["create", "t"], "arguments"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, message):
    result = service(tmp_path, *args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nodepass-service: error:")
    assert message in lines[0]
    assert files_under(tmp_path) == []


# -- an instance running a tunnels file -----------------------------------------------

TUNNELS = ("web server://127.0.0.1:10101/127.0.0.1:8080?max=64\n"
           "ssh client://127.0.0.1:10101/127.0.0.1:22?min=4\n")


def write_tunnels(tmp_path: Path, text: str, name: str = "tunnels") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_create_from_a_tunnels_file(tmp_path):
    root = tmp_path / "root"
    source = write_tunnels(tmp_path, TUNNELS)
    out = ok(root, "create", "set", "--config", source, "--metrics", "127.0.0.1:9100",
             "--env", "SHUTDOWN_TIMEOUT=8s")
    installed = root / CONFIG / "set.tunnels"
    assert installed.read_text() == TUNNELS
    assert stat.S_IMODE(installed.stat().st_mode) == 0o640  # it may hold shared keys
    env = (root / CONFIG / "set.env").read_text()
    assert "NODEPASS_CONFIG='/etc/nodepass/set.tunnels'\n" in env
    assert "NODEPASS_URL" not in env and "SHUTDOWN_TIMEOUT='8s'\n" in env
    unit = dropin(root, "set", "tunnels.conf").read_text()
    for line in ("Type=notify\n", "NotifyAccess=main\n", "ExecStart=\n",
                 'ExecStart=/opt/nodepass-gevent/venv/bin/nodepass --config '
                 '"/etc/nodepass/set.tunnels" --metrics 127.0.0.1:9100\n'):
        assert line in unit
    assert "TimeoutStopSec=13s" in dropin(root, "set", "stop.conf").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in (root / TEMPLATE).read_text()
    assert "not running: systemctl enable" in out
    rows = ok(root, "list").splitlines()
    assert rows[1].split() == ["set", "tunnels", "-", "-", "--config",
                               "/etc/nodepass/set.tunnels"]
    # Back to a URL: the file and its drop-in go.
    ok(root, "create", "--force", "set", CLIENT_URL)
    assert not installed.exists() and not dropin(root, "set", "tunnels.conf").exists()
    ok(root, "delete", "set")
    assert files_under(root / CONFIG) == []


def test_a_tunnels_file_below_1024_gets_the_bind_capability(tmp_path):
    root = tmp_path / "root"
    ok(root, "create", "set", "--config",
       write_tunnels(tmp_path, "a client://h:1/t:2\nb server://:443/127.0.0.1:8080\n"))
    assert "CAP_NET_BIND_SERVICE" in dropin(root, "set", "bind.conf").read_text()


def test_a_url_with_its_own_settings_is_accepted_and_sets_the_stop_timeout(tmp_path):
    ok(tmp_path, "create", "t", CLIENT_URL + "?min=4&shutdown_timeout=30s")
    assert "TimeoutStopSec=35s" in dropin(tmp_path, "t", "stop.conf").read_text()


@pytest.mark.parametrize("text, message", [
    ("web server://:1/:2?tls=7\n", "tunnels file refused: nodepass: error:"),
    ("a client://h:1/t:2\na client://h:3/t:4\n", "both named 'a'"),
    ("", "no tunnel in the file"),
])
def test_a_bad_tunnels_file_is_refused_before_anything_is_written(tmp_path, text, message):
    root = tmp_path / "root"
    result = service(root, "create", "set", "--config", write_tunnels(tmp_path, text))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not root.exists() or files_under(root) == []


def test_create_takes_a_url_or_a_file_not_both(tmp_path):
    path = write_tunnels(tmp_path, TUNNELS)
    for args in (["create", "set", CLIENT_URL, "--config", path],
                 ["create", "set", CLIENT_URL, "--metrics", "127.0.0.1:9100"]):
        result = service(tmp_path / "root", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_reload_checks_and_replaces_the_file_then_signals(tmp_path):
    root = tmp_path / "root"
    ok(root, "create", "set", "--config", write_tunnels(tmp_path, TUNNELS))
    installed = root / CONFIG / "set.tunnels"
    assert "not running: systemctl reload nodepass@set.service" in ok(root, "reload", "set")
    bad = write_tunnels(tmp_path, "web server://:1/:2?max=0\n", "bad")
    result = service(root, "reload", "set", "--config", bad)
    assert result.returncode == 2 and "bad max='0'" in result.stderr
    assert installed.read_text() == TUNNELS  # the running set's file is kept
    privileged = write_tunnels(tmp_path, "web server://:80/127.0.0.1:8080\n", "low")
    result = service(root, "reload", "set", "--config", privileged)
    assert result.returncode == 2 and "takes a restart" in result.stderr
    good = write_tunnels(tmp_path, TUNNELS + "dns client://h:10103/127.0.0.1:53"
                         "?shutdown_timeout=20s\n", "good")
    out = ok(root, "reload", "set", "--config", good)
    assert "dns client://" in installed.read_text()
    # Its longer drain lengthens the stop timeout: a daemon-reload, then the reload.
    assert "TimeoutStopSec=25s" in dropin(root, "set", "stop.conf").read_text()
    assert out.index("systemctl daemon-reload") < out.index("systemctl reload nodepass@set")
    # A URL instance reloads too (its certificates), but has no file to replace.
    ok(root, "create", "one", SERVER_URL)
    assert "systemctl reload nodepass@one.service" in ok(root, "reload", "one")
    result = service(root, "reload", "one", "--config", good)
    assert result.returncode == 2 and "runs a URL" in result.stderr


# -- a master (master://: the REST API) as a service ----------------------------------

MASTER_URL = "master://127.0.0.1:9090/api?tls=1"
STATE = Path("var/lib/nodepass-gevent")


def test_create_a_master_keeps_its_state_in_the_state_directory(tmp_path):
    out = ok(tmp_path, "create", "api", MASTER_URL)
    assert "created tunnel api (nodepass@api.service)" in out
    assert "NODEPASS_URL='{}'\n".format(MASTER_URL) in (tmp_path / CONFIG / "api.env").read_text()
    master = dropin(tmp_path, "api", "master.conf").read_text()
    for line in ("StateDirectory=nodepass-gevent/api\n", "StateDirectoryMode=0700\n",
                 "ExecReload=\n"):
        assert line in master
    assert not re.search(r"^Type=", master, re.M)  # the template's simple: no sd_notify
    assert "TimeoutStopSec=10s" in dropin(tmp_path, "api", "stop.conf").read_text()
    assert not dropin(tmp_path, "api", "bind.conf").exists()
    assert not dropin(tmp_path, "api", "tunnels.conf").exists()
    # The template, with its sandbox, runs the master's URL as it runs a tunnel's.
    template = (tmp_path / TEMPLATE).read_text()
    assert "ExecStart=/opt/nodepass-gevent/venv/bin/nodepass ${NODEPASS_URL}" in template
    assert "ProtectSystem=strict" in template and "NoNewPrivileges=yes" in template
    rows = ok(tmp_path, "list").splitlines()
    assert rows[1].split() == ["api", "master", "-", "-", MASTER_URL]
    assert "state /var/lib/nodepass-gevent/api (StateDirectory=)" in ok(tmp_path, "status", "api")
    result = service(tmp_path, "reload", "api")
    assert result.returncode == 2 and "is a master: it has nothing to reload" in result.stderr
    assert "systemctl reload" not in result.stdout


@pytest.mark.parametrize("url, message", [
    ("master://127.0.0.1:9090/api?state=/srv/master", "drop state= from the URL"),
    ("master://127.0.0.1:9090/api?tls=7", "URL refused: nodepass: error: bad tls value"),
    ("master://127.0.0.1:99999/api", "URL refused"),
    ("master://127.0.0.1:9090/api?tls=2&crt=/nonexistent.pem&key=/x", "URL refused"),
])
def test_a_bad_master_url_is_refused_before_anything_is_written(tmp_path, url, message):
    result = service(tmp_path, "create", "api", url)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert files_under(tmp_path) == []


def test_a_master_below_1024_binds_and_force_turns_it_into_a_tunnel(tmp_path):
    ok(tmp_path, "create", "api", "master://:443/api?tls=1")
    assert "CAP_NET_BIND_SERVICE" in dropin(tmp_path, "api", "bind.conf").read_text()
    ok(tmp_path, "create", "--force", "api", "master://127.0.0.1:9090/api?metrics=:9100")
    assert not dropin(tmp_path, "api", "bind.conf").exists()
    ok(tmp_path, "create", "--force", "api", "master://127.0.0.1:9090/api?metrics=:910")
    assert dropin(tmp_path, "api", "bind.conf").exists()  # metrics= listens too
    ok(tmp_path, "create", "--force", "api", CLIENT_URL)
    assert not dropin(tmp_path, "api", "master.conf").exists()


def test_delete_keeps_a_masters_state_and_purge_removes_it(tmp_path):
    ok(tmp_path, "create", "api", MASTER_URL)
    state = tmp_path / STATE / "api"
    state.mkdir(parents=True)  # systemd makes it (StateDirectory=), the master fills it
    (state / "master.json").write_text("{}")
    assert "kept the master's state" in ok(tmp_path, "delete", "api")
    assert (state / "master.json").exists()
    ok(tmp_path, "create", "api", MASTER_URL)
    ok(tmp_path, "create", "web", SERVER_URL)
    ok(tmp_path, "uninstall", "--purge")
    assert files_under(tmp_path) == [] and not (tmp_path / STATE).exists()


def test_the_master_unit_keeps_its_key_in_the_state_directory(tmp_path):
    """The env file's URL run as the unit runs it, with the $STATE_DIRECTORY
    systemd gives it: the key is made there (0600), and kept on the next start."""
    root = tmp_path / "root"
    ok(root, "create", "api", "master://127.0.0.1:0/api")
    url = re.search(r"^NODEPASS_URL='(.*)'$", (root / CONFIG / "api.env").read_text(),
                    re.M).group(1)
    state = root / STATE / "api"
    state.mkdir(parents=True, mode=0o700)
    keys = [run_master_until_listening(url, state) for _ in range(2)]
    saved = json.loads((state / "master.json").read_text())
    assert keys[0] == saved["key"] and re.fullmatch(r"[0-9a-f]{32}", keys[0])
    assert keys[1] is None  # the second start found the key: nothing created
    assert stat.S_IMODE((state / "master.json").stat().st_mode) == 0o600
    checked = subprocess.run([sys.executable, "-m", "nodepass_gevent", "--check", url],
                             env=dict(os.environ, PYTHONPATH=str(REPO),
                                      STATE_DIRECTORY=str(tmp_path / "unused")),
                             stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert checked.returncode == 0 and checked.stdout.startswith("ok: master API on ")
    assert not (tmp_path / "unused").exists()  # --check makes no state


def run_master_until_listening(url: str, state: Path):
    """Start ``nodepass URL`` with STATE_DIRECTORY, wait for it to listen, SIGTERM
    it; the key it logged as created (None if it created none)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               STATE_DIRECTORY=str(state))
    process = subprocess.Popen([sys.executable, "-m", "nodepass_gevent", url], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               universal_newlines=True)
    lines = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if not line or "Master API listening" in line:
                break
        assert "Master API listening" in lines[-1], "".join(lines)
        # An answer: the master waits for its signals now (it installs their
        # handlers after that log line), so SIGTERM is its graceful stop.
        port = int(re.search(r"127\.0\.0\.1:(\d+)/api/v1", lines[-1]).group(1))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/v1/openapi.json")
        assert connection.getresponse().status == 200
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    created = [line for line in lines if "API Key created: " in line]
    return created[0].rsplit("API Key created: ", 1)[1].strip() if created else None


def test_certificate_in_private_tmp_is_refused(tmp_path, test_ca):
    # test_ca lives under /tmp, which the unit replaces by its own (PrivateTmp).
    url = "server://127.0.0.1:10101/127.0.0.1:8080?tls=2&crt={crt}&key={key}".format(**test_ca)
    result = service(tmp_path, "create", "t", url)
    assert result.returncode == 2 and "invisible to the service" in result.stderr
    assert files_under(tmp_path) == []


@pytest.fixture
def certificates_in_home():
    """A CA and server certificate under the home directory, removed afterwards."""
    home = Path.home()
    if not re.match(r"/(home|root)(/|$)", str(home)):
        pytest.skip("home directory {} is not one ProtectHome= hides".format(home))
    folder = tempfile.mkdtemp(prefix="nodepass-test-", dir=str(home))
    try:
        yield make_test_ca(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_certificate_under_home_is_bind_mounted_read_only(tmp_path, certificates_in_home):
    paths = certificates_in_home
    url = "server://127.0.0.1:10101/127.0.0.1:8080?tls=2&crt={crt}&key={key}".format(**paths)
    ok(tmp_path, "create", "sec", url)
    tls = dropin(tmp_path, "sec", "tls.conf").read_text()
    assert "ProtectHome=tmpfs\n" in tls
    assert 'BindReadOnlyPaths="{crt}" "{key}"\n'.format(**paths) in tls


def test_help_and_dry_run_agree_on_the_service_user(tmp_path):
    """install and create both create the user unless it exists, as --help says;
    with --root each prints the useradd it would run, or that none is needed."""
    help_text = ok(tmp_path, "--help")
    install_help = help_text[help_text.index("  install "):help_text.index("  create ")]
    create_help = help_text[help_text.index("  create "):help_text.index("  reload ")]
    assert "create the service" in install_help and "user" in install_help
    assert "creates\n                 the service user too if it does not exist" in create_help
    absent = "nodepass-test-absent-user"
    out = ok(tmp_path, "create", "--user", absent, "web", SERVER_URL)
    assert "--root given, not running: useradd --system --user-group --no-create-home " \
        "--home-dir /nonexistent --shell /usr/sbin/nologin {}\n".format(absent) in out
    out = ok(tmp_path, "create", "--force", "--user", "root", "web", SERVER_URL)
    assert "not running: useradd" not in out
    assert "--root given: service user root exists on this host, no useradd needed\n" in out
    out = ok(tmp_path, "uninstall", "--purge", "--user", absent)
    assert "service user {} does not exist on this host, no userdel needed".format(absent) in out


def test_create_over_an_existing_tunnel_needs_force(tmp_path):
    ok(tmp_path, "create", "t", "server://:443/127.0.0.1:8080")
    before = (tmp_path / CONFIG / "t.env").read_text()
    result = service(tmp_path, "create", "t", "server://:8443/127.0.0.1:8080")
    assert result.returncode == 1 and "exists" in result.stderr
    assert (tmp_path / CONFIG / "t.env").read_text() == before
    ok(tmp_path, "create", "--force", "t", "server://:8443/127.0.0.1:8080")
    assert "server://:8443/" in (tmp_path / CONFIG / "t.env").read_text()
    assert not dropin(tmp_path, "t", "bind.conf").exists()  # no longer below 1024


@pytest.mark.parametrize("verb", ["start", "stop", "restart", "status", "delete"])
def test_unknown_tunnel_is_an_error(tmp_path, verb):
    ok(tmp_path, "create", "known", CLIENT_URL)
    result = service(tmp_path, verb, "unknown")
    assert result.returncode == 1
    assert result.stderr.strip() == \
        "nodepass-service: error: unknown tunnel 'unknown' (see: nodepass-service list)"


@pytest.mark.parametrize("verb", ["start", "stop", "restart", "status"])
def test_systemctl_verbs_are_shown_not_run_under_root(tmp_path, verb):
    ok(tmp_path, "create", "web", SERVER_URL)
    out = ok(tmp_path, verb, "web")
    shown = "systemctl status --no-pager" if verb == "status" else "systemctl " + verb
    assert "--root given, not running: {} nodepass@web.service\n".format(shown) in out
    if verb == "status":
        assert "tunnel web: " + SERVER_URL in out


def test_list_and_delete(tmp_path):
    assert "no tunnels" in ok(tmp_path, "list")
    ok(tmp_path, "create", "web", SERVER_URL)
    ok(tmp_path, "create", "ssh", CLIENT_URL)
    rows = ok(tmp_path, "list").splitlines()
    assert rows[0].split() == ["NAME", "MODE", "ACTIVE", "ENABLED", "URL"]
    assert rows[1].split() == ["ssh", "client", "-", "-", CLIENT_URL]
    assert rows[2].split() == ["web", "server", "-", "-", SERVER_URL]

    out = ok(tmp_path, "delete", "web")
    assert "not running: systemctl disable --now nodepass@web.service" in out
    assert not (tmp_path / CONFIG / "web.env").exists()
    assert not (tmp_path / UNITS / "nodepass@web.service.d").exists()
    assert [row.split()[0] for row in ok(tmp_path, "list").splitlines()[1:-1]] == ["ssh"]


def test_uninstall_keeps_tunnels_unless_purged(tmp_path):
    ok(tmp_path, "create", "web", SERVER_URL)
    venv_file = tmp_path / VENV_BIN / "python"
    venv_file.parent.mkdir(parents=True)
    venv_file.write_text("")
    result = service(tmp_path, "uninstall")
    assert result.returncode == 1 and "tunnels exist: web" in result.stderr
    assert venv_file.exists()

    out = ok(tmp_path, "uninstall", "--purge")
    assert "deleted tunnel web" in out
    assert files_under(tmp_path) == []
    assert not (tmp_path / "opt" / "nodepass-gevent").exists()
    assert not (tmp_path / CONFIG).exists()


# -- the interactive menu, on a real pseudo-terminal ------------------------------

def run_on_terminal(args: List[str], keystrokes: str, timeout: float = 30) -> str:
    """Run the script with a pty as its terminal, type, and return what it showed."""
    controller, terminal = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, str(SCRIPT)] + args, stdin=terminal,
                               stdout=terminal, stderr=terminal, env=env, close_fds=True)
    os.close(terminal)
    shown = b""
    try:
        os.write(controller, keystrokes.encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the terminal closed: the script is gone
                    break
                if not chunk:
                    break
                shown += chunk
            elif process.poll() is not None:
                break
        assert process.wait(5) == 0, shown.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        os.close(controller)
    return shown.decode(errors="replace")


def test_menu_creates_and_lists_a_tunnel(tmp_path):
    keystrokes = "2\nweb\n{}\nSHUTDOWN_TIMEOUT=2s\n\n7\nq\n".format(SERVER_URL)
    shown = run_on_terminal(["--root", str(tmp_path)], keystrokes)
    assert "10) uninstall" in shown
    assert "created tunnel web" in shown
    assert re.search(r"web\s+server\s+-\s+-\s+" + re.escape(SERVER_URL), shown)
    assert "SHUTDOWN_TIMEOUT='2s'" in (tmp_path / CONFIG / "web.env").read_text()


# -- Python 3.6 and 3.8: the host's python3 runs this script -------------------------


@pytest.mark.parametrize("minor", [6, 8])
def test_script_runs_on_an_old_python(tmp_path, minor):
    python = find_python(minor)
    if python is None:
        pytest.skip("no Python 3.{} interpreter on this machine".format(minor))
    result = service(tmp_path, "list", python=python)
    assert result.returncode == 0 and "no tunnels" in result.stdout, result.stderr
    result = service(tmp_path, "create", "a/b", CLIENT_URL, python=python)
    assert result.returncode == 2 and "bad tunnel name" in result.stderr
    # The dry run prints the commands it would run (shlex.join is 3.8+).
    ok(tmp_path, "create", "t", CLIENT_URL, "--no-start")
    result = service(tmp_path, "start", "t", python=python)
    assert result.returncode == 0, result.stderr
    assert "not running: systemctl start nodepass@t.service" in result.stdout


# -- a real install, then systemd-analyze verify on the units ---------------------

INSTALL_OUTPUT = []  # type: List[str]


@pytest.fixture(scope="module")
def installed_root(tmp_path_factory):
    """A root with the package pip-installed into its venv and four tunnels created.

    --system-site-packages: the dependencies come from this interpreter, so
    nothing but the package itself (and pip's build backend) is fetched.
    """
    root = tmp_path_factory.mktemp("installed")
    started = time.monotonic()
    INSTALL_OUTPUT.append(ok(root, "install", "--system-site-packages"))
    install_seconds = time.monotonic() - started
    assert install_seconds < 120
    ok(root, "create", "web", SERVER_URL, "--env", "SHUTDOWN_TIMEOUT=20s")
    ok(root, "create", "low", "server://:443/127.0.0.1:80?log=warn")
    ok(root, "create", "ssh", CLIENT_URL, "--env", "SSL_CERT_FILE=/etc/nodepass/ca.pem")
    tunnels = root.parent / (root.name + "-tunnels")
    tunnels.write_text(TUNNELS)
    ok(root, "create", "set", "--config", str(tunnels), "--metrics", "127.0.0.1:9100")
    return root


def test_install_puts_the_package_in_its_own_venv(installed_root):
    nodepass = installed_root / VENV_BIN / "nodepass"
    version = subprocess.run([str(nodepass), "--version"], stdout=subprocess.PIPE,
                             universal_newlines=True, timeout=30)
    assert version.returncode == 0 and "nodepass-gevent" in version.stdout
    packages = glob.glob(str(installed_root / "opt/nodepass-gevent/venv/lib/python3*"
                             / "site-packages/nodepass_gevent/cli.py"))
    assert packages, "the package is not in the venv's site-packages"
    assert (installed_root / TEMPLATE).exists()
    assert '"source": "{}"'.format(REPO) in (installed_root / CONFIG / "install.json").read_text()


def test_install_says_what_it_does_about_the_service_user(installed_root):
    """After pip (a failed install leaves no user), next to the daemon-reload."""
    out = INSTALL_OUTPUT[0]
    user_line = "--root given, not running: useradd --system" if "useradd" in out \
        else "--root given: service user nodepass exists on this host"
    assert out.index("Successfully installed ") < out.index(user_line) < \
        out.index("--root given, not running: systemctl daemon-reload"), out


def test_pip_installs_the_nodepass_service_console_script(installed_root, tmp_path):
    """pip users get nodepass-service too: the venv's console script runs the
    same code as scripts/nodepass-service."""
    script = installed_root / VENV_BIN / "nodepass-service"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(script), "--root", str(tmp_path), "create", "web", SERVER_URL,
                             "--no-start"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "created tunnel web (nodepass@web.service)" in result.stdout
    assert "NODEPASS_URL='{}'".format(SERVER_URL) in (tmp_path / CONFIG / "web.env").read_text()
    result = subprocess.run([str(script), "--help"], stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=60, env=env)
    assert result.returncode == 0 and result.stdout == ok(tmp_path, "--help")


def analyze(root: Path, *units: str) -> subprocess.CompletedProcess:
    """systemd-analyze verify reading units from root, as a booted system would."""
    executable = shutil.which("systemd-analyze")
    assert executable, "systemd-analyze is missing: apt-get install systemd"
    system_units = root / "usr/lib/systemd/system"
    system_units.mkdir(parents=True, exist_ok=True)
    for target in SYSTEM_TARGETS:
        source = next(Path(d, target) for d in ("/usr/lib/systemd/system", "/lib/systemd/system")
                      if Path(d, target).exists())
        shutil.copyfile(str(source), str(system_units / target))
    # ExecReload= runs /bin/kill (procps), which a booted Debian has.
    kill = root / "bin" / "kill"
    if not kill.exists():
        kill.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath("/bin/kill"), str(kill))
    return subprocess.run([executable, "verify", "--root={}".format(root)] + list(units),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)


def test_generated_units_pass_systemd_analyze_verify(installed_root, certificates_in_home):
    url = "server://127.0.0.1:10101/127.0.0.1:8080?tls=2&crt={crt}&key={key}".format(
        **certificates_in_home)
    ok(installed_root, "create", "--force", "sec", url)
    ok(installed_root, "create", "--force", "api", MASTER_URL)
    units = ["nodepass@{}.service".format(name)
             for name in ("web", "low", "ssh", "sec", "set", "api")]
    try:
        result = analyze(installed_root, *units)
    finally:
        ok(installed_root, "delete", "api")  # the fixture's tunnels as the later tests know them
    assert result.returncode == 0, result.stdout
    # verify only warns (exit 0) on unknown keys or bad values: any word about our units fails.
    assert "nodepass" not in result.stdout, result.stdout


def test_verify_harness_reads_our_dropins(installed_root, tmp_path):
    """The check above can fail: verify sees a broken drop-in and a missing ExecStart."""
    broken = dropin(installed_root, "low", "bind.conf")
    original = broken.read_text()
    broken.write_text(original + "NotASystemdKey=yes\n")
    try:
        result = analyze(installed_root, "nodepass@low.service")
    finally:
        broken.write_text(original)
    assert "bind.conf" in result.stdout, result.stdout

    nodepass = installed_root / VENV_BIN / "nodepass"
    moved = tmp_path / "nodepass"
    shutil.move(str(nodepass), str(moved))
    try:
        result = analyze(installed_root, "nodepass@web.service")
    finally:
        shutil.move(str(moved), str(nodepass))
    assert result.returncode != 0 and "not executable" in result.stdout, result.stdout


def test_update_reinstalls_and_restarts_the_tunnels(installed_root):
    out = ok(installed_root, "update")
    assert "not running: systemctl daemon-reload" in out
    assert re.search(r"not running: systemctl try-restart nodepass@low\.service "
                     r"nodepass@\w+\.service", out)
    assert "Successfully installed nodepass-gevent" in out


def test_shared_key_goes_into_the_environment_file_not_the_url(tmp_path):
    root = tmp_path / "root"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), "create", "keyed",
         "client://tunnel.example.net:10101/127.0.0.1:22", "--env", "NODEPASS_KEY=s3cret",
         "--no-start"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    env_file = root / "etc" / "nodepass" / "keyed.env"
    text = env_file.read_text()
    assert "NODEPASS_KEY='s3cret'" in text
    assert "s3cret" not in text.split("NODEPASS_URL=")[1].splitlines()[0]
    assert oct(env_file.stat().st_mode & 0o777) == "0o640"


# -- a host without pip: install --pyz ----------------------------------------------

PYZ_TEMPLATE_LINES = ("CacheDirectory=nodepass-gevent\n",
                      "Environment=NODEPASS_PYZ_CACHE=/var/cache/nodepass-gevent\n",
                      "ProtectSystem=strict\n", "ProtectHome=yes\n", "User=nodepass\n")


@pytest.fixture(scope="module")
def pyz_file(pyz_build) -> Path:
    """The nodepass.pyz of the session (for every Python: test_pyz.py tests those)."""
    return pyz_build[0]


def pyz_service(root: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    """The script without PYTHONPATH: the URL check must come from the installed pyz."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["NODEPASS_PYZ_CACHE"] = str(cache)
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root)] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          universal_newlines=True, timeout=180, stdin=subprocess.DEVNULL)


@pytest.fixture
def pyz_root(tmp_path, pyz_file):
    """A root with the pyz installed, run by this interpreter."""
    root = tmp_path / "root"
    result = pyz_service(root, tmp_path / "operator-cache", "install", "--pyz", str(pyz_file),
                         "--python", sys.executable)
    assert result.returncode == 0, result.stderr + result.stdout
    return root, result


def test_install_pyz_copies_the_file_and_the_units_run_it(pyz_root, pyz_file):
    root, result = pyz_root
    installed = root / "opt/nodepass-gevent/nodepass.pyz"
    assert installed.read_bytes() == pyz_file.read_bytes()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o644
    assert re.search(r"installed nodepass-gevent \S+ .* as \S+nodepass\.pyz, run by ", result.stdout)
    assert not (root / "opt/nodepass-gevent/venv").exists()  # no pip, no venv
    template = (root / TEMPLATE).read_text()
    assert "ExecStart={} /opt/nodepass-gevent/nodepass.pyz ${{NODEPASS_URL}}\n".format(
        sys.executable) in template
    for line in PYZ_TEMPLATE_LINES:
        assert line in template
    record = json.loads((root / CONFIG / "install.json").read_text())
    assert record["kind"] == "pyz" and record["python"] == sys.executable
    assert record["pyz"] == str(pyz_file)


def test_install_pyz_warns_about_an_interpreter_the_unit_cannot_see(pyz_root):
    _, result = pyz_root
    home_python = re.match(r"/(home|root|run/user)(/|$)", sys.executable)
    assert ("which the units cannot see (ProtectHome=yes)" in result.stderr) == bool(home_python)


def test_create_checks_the_url_with_the_installed_pyz(pyz_root, tmp_path):
    root, _ = pyz_root
    cache = tmp_path / "fresh-cache"
    refused = pyz_service(root, cache, "create", "t", "server://127.0.0.1/127.0.0.1:2")
    assert refused.returncode == 2 and "URL refused" in refused.stderr, refused.stderr
    assert list(cache.glob("*/*/.nodepass-pyz-complete")), "the pyz did not do the check"
    created = pyz_service(root, cache, "create", "web", SERVER_URL)
    assert created.returncode == 0, created.stderr
    assert "not running: systemctl enable --now nodepass@web.service" in created.stdout


def test_the_units_command_runs_as_the_service_would(pyz_root, tmp_path):
    """ExecStart as written, in the unit's environment: no HOME, the cache directory."""
    root, _ = pyz_root
    template = (root / TEMPLATE).read_text()
    exec_start = re.search(r"^ExecStart=(.*) \$\{NODEPASS_URL\}$", template, re.M).group(1)
    command = exec_start.split()
    command[-1] = str(root) + command[-1]  # the pyz, where --root put it
    cache = root / "var/cache/nodepass-gevent"
    cache.mkdir(parents=True)  # systemd makes it (CacheDirectory=)
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "NODEPASS_PYZ_CACHE": str(cache)}
    result = subprocess.run(command + ["--check", SERVER_URL], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("ok: server"), result.stderr
    assert result.stderr == ""  # no fallback to a temporary directory: the cache was used
    assert list(cache.glob("*/*/.nodepass-pyz-complete"))


def test_pyz_units_pass_systemd_analyze_verify(pyz_root, tmp_path):
    root, _ = pyz_root
    assert pyz_service(root, tmp_path / "c", "create", "web", SERVER_URL).returncode == 0
    assert pyz_service(root, tmp_path / "c", "create", "low", "server://:443/127.0.0.1:80"
                       ).returncode == 0
    # The interpreter the units name, as verify looks it up inside the root.
    stub = root / sys.executable.lstrip("/")
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    result = analyze(root, "nodepass@web.service", "nodepass@low.service")
    assert result.returncode == 0, result.stdout
    assert "nodepass" not in result.stdout, result.stdout


@pytest.mark.parametrize("args, message", [
    (["--pyz", "/nonexistent/nodepass.pyz"], "no such file"),
    (["--pyz", __file__], "not a nodepass.pyz"),
    (["--pyz", "PYZ", "--python", "/nonexistent/python3"], "no such interpreter"),
    (["--pyz", "PYZ", "--source", "."], "do not apply"),
])
def test_install_pyz_refuses_bad_input_before_writing(tmp_path, pyz_file, args, message):
    root = tmp_path / "root"
    args = [str(pyz_file) if arg == "PYZ" else arg for arg in args]
    result = pyz_service(root, tmp_path / "cache", "install", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not root.exists() or files_under(root) == []


def test_install_pyz_refuses_a_python_that_cannot_run_it(tmp_path, pyz_file):
    python27 = sorted(glob.glob("/root/.pyenv/versions/2.7*/bin/python")) or \
        list(filter(None, [shutil.which("python2.7")]))
    if not python27:
        pytest.skip("no Python 2.7 on this machine")
    root = tmp_path / "root"
    result = pyz_service(root, tmp_path / "cache", "install", "--pyz", str(pyz_file),
                         "--python", python27[0])
    assert result.returncode == 1
    assert "cannot run" in result.stderr and "nodepass.pyz needs CPython" in result.stderr
    assert not (root / "opt/nodepass-gevent/nodepass.pyz").exists()
    assert not (root / CONFIG / "install.json").exists()


def test_update_pyz_replaces_it_restarts_and_prunes_old_builds(pyz_root, pyz_file, tmp_path):
    root, _ = pyz_root
    assert pyz_service(root, tmp_path / "c", "create", "web", SERVER_URL).returncode == 0
    cache = root / "var/cache/nodepass-gevent"
    (cache / "0ld0ld0ld0ld0ld0" / "cp38").mkdir(parents=True)  # a previous build's files
    with zipfile.ZipFile(str(pyz_file)) as archive:
        build = json.loads(archive.read("nodepass-pyz.json").decode())["build"]
    (cache / build).mkdir()
    newer = tmp_path / "newer.pyz"
    shutil.copyfile(str(pyz_file), str(newer))
    result = pyz_service(root, tmp_path / "c", "update", "--pyz", str(newer))
    assert result.returncode == 0, result.stderr
    assert "not running: systemctl try-restart nodepass@web.service" in result.stdout
    assert sorted(p.name for p in cache.iterdir()) == [build]
    assert json.loads((root / CONFIG / "install.json").read_text())["pyz"] == str(newer)
    assert "--pyz FILE" in pyz_service(root, tmp_path / "c", "update", "--source", "."
                                       ).stderr


def test_uninstall_removes_the_pyz_and_its_cache(pyz_root, tmp_path):
    root, _ = pyz_root
    assert pyz_service(root, tmp_path / "c", "create", "web", SERVER_URL).returncode == 0
    (root / "var/cache/nodepass-gevent/somebuild").mkdir(parents=True)
    result = pyz_service(root, tmp_path / "c", "uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert files_under(root) == []
    assert not (root / "opt/nodepass-gevent").exists()
    assert not (root / "var/cache/nodepass-gevent").exists()
