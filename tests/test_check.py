"""Nothing ambiguous accepted, and errors that say which thing and what to do:
repeated parameters, which source wins, data_port=, and what --check and the
start-up say about ports in use, certificates and a readable tunnels file.

Each case is one short process (real ports from the OS, real files); the one
end-to-end case (data_port= carrying traffic) starts a server and a client.
"""

import os
import signal
import socket

import pytest

from support import HOST, echo_works, free_port, make_test_ca, run_nodepass, wait_until


def one_line(result, status: int, prefix: str = "nodepass: error: ") -> str:
    """The one stderr line of a run that exited with ``status``, without traceback."""
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0][len(prefix):]


def server_url(query: str = "", tunnel: int = 0, target: int = 0) -> str:
    return "server://%s:%d/%s:%d%s" % (HOST, tunnel or free_port(), HOST, target or free_port(),
                                       "?" + query if query else "")


@pytest.fixture
def busy_tcp():
    """A TCP port another program listens on."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- repeated and unknown parameters ---------------------------------------------

@pytest.mark.matrix
@pytest.mark.parametrize("query, name, values", [
    ("tls=1&tls=0", "tls", ("1", "0")),
    ("max=3&max=5", "max", ("3", "5")),            # a tunnel setting (tunnelset.py)
    ("data_port=7000&log=debug&data_port=7001", "data_port", ("7000", "7001")),
])
def test_a_parameter_given_twice_is_refused(query, name, values):
    result = run_nodepass(["--check", server_url(query)])
    assert one_line(result, 2) == "URL parameter %r is given twice (%s=%s and %s=%s): give it" \
        " once" % (name, name, values[0], name, values[1])


def test_an_unknown_parameter_is_refused_for_its_mode():
    result = run_nodepass(["--check", "client://%s:1/%s:2?data_port=5" % (HOST, HOST)])
    assert one_line(result, 2).startswith("unknown URL parameter 'data_port': this mode takes"
                                          " log, tls, log_format, wire, type, and the tunnel settings")


# -- which source wins ----------------------------------------------------------

def test_check_says_the_url_wins_over_the_environment(tmp_path):
    path = tmp_path / "tunnels"
    path.write_text("web %s\n" % server_url("max=5&slot=7").replace("://", "://k3y@"))
    path.chmod(0o600)
    result = run_nodepass(["--check", "--config", str(path)],
                          env={"MAX_POOL_CAPACITY": "2000", "NODEPASS_KEY": "other"})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok: web: server ") and lines[0].endswith(" auth=on max=5 slot=7")
    # slot= has no variable set beside it: no note. max= and the key have one each.
    assert lines[1:] == [
        "  max=5: the URL's, not MAX_POOL_CAPACITY=2000 from the environment (the URL wins)",
        "  key: the URL's, not NODEPASS_KEY from the environment (the URL wins)"]


# -- data_port= -----------------------------------------------------------------

@pytest.mark.parametrize("query, message", [
    ("data_port=70000", "bad data_port value '70000': expected a port from 1 to 65535"),
    ("data_port=x", "bad data_port value 'x'"),
])
def test_a_bad_data_port_is_refused(query, message):
    assert message in one_line(run_nodepass(["--check", server_url(query)]), 2)


def test_the_data_port_must_differ_from_the_tunnel_and_target_ports():
    tunnel, target = free_port(), free_port()
    same_as_tunnel = server_url("data_port=%d" % tunnel, tunnel, target)
    assert one_line(run_nodepass(["--check", same_as_tunnel]), 2) == \
        "data_port=%d is the tunnel port: data connections need a port of their own, pick" \
        " another" % tunnel
    same_as_target = server_url("data_port=%d" % target, tunnel, target)
    assert one_line(run_nodepass(["--check", same_as_target]), 2) == \
        "the target and data ports are both %d: each needs a port of its own" % target


def test_check_shows_udp_v1_only_where_it_pins_the_old_default():
    pinned = run_nodepass(["--check", server_url("udp=v1")])
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.endswith(" auth=off udp=v1\n"), pinned.stdout
    default = run_nodepass(["--check", server_url()])
    assert default.returncode == 0 and "udp=" not in default.stdout, default.stdout


def test_check_shows_the_data_port():
    port = free_port()
    result = run_nodepass(["--check", server_url("data_port=%d" % port)])
    assert result.returncode == 0, result.stderr
    assert (" auth=off data_port=%d\n" % port) in result.stdout


def test_a_set_data_port_is_announced_and_carries_traffic(nodepass, echo):
    tunnel, target, data = free_port(), free_port(), free_port()
    server = nodepass(server_url("data_port=%d" % data, tunnel, target), status=True)
    nodepass("client://%s:%d/%s:%d" % (HOST, tunnel, HOST, echo.port))
    wait_until(lambda: echo_works(target), 15, what="traffic through data_port=%d" % data)
    assert server.status()["data_port"] == data
    assert "data port %d," % data in server.output()


# -- ports in use: at start-up and in --check --------------------------------------

@pytest.mark.matrix
@pytest.mark.parametrize("role", ["tunnel", "target", "data"])
def test_check_fails_for_a_port_in_use_naming_its_role(busy_tcp, role):
    tunnel, target = (busy_tcp, 0) if role == "tunnel" else (0, busy_tcp) \
        if role == "target" else (0, 0)
    url = server_url("data_port=%d" % busy_tcp if role == "data" else "", tunnel, target)
    line = one_line(run_nodepass(["--check", url]), 1)
    where = "data port (data_port=)" if role == "data" else role + " port"
    assert line.startswith("cannot listen on the %s at TCP %s:%d: Address already in use: is"
                           " another nodepass or service on it? pick another port (held by pid"
                           " %d: " % (where, HOST, busy_tcp, os.getpid())), line


def test_check_fails_for_a_udp_target_port_in_use():
    port = free_port()  # its TCP side kept from other processes' connects (TIME_WAIT)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind((HOST, port))
        line = one_line(run_nodepass(["--check", server_url(target=port)]), 1)
    assert line.startswith("cannot listen on the target port at UDP %s:%d: Address already in"
                           " use" % (HOST, port)), line


def test_check_warns_of_a_port_a_running_nodepass_holds(nodepass):
    tunnel = free_port()
    url = server_url(tunnel=tunnel)
    server = nodepass(url)
    server.wait_for_output("Server: tunnel")
    result = run_nodepass(["--check", url])
    assert result.returncode == 0 and result.stdout.startswith("ok: server"), result.stderr
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 3  # tunnel, target TCP, target UDP
    assert warnings[0].startswith("nodepass: warning: the tunnel port at TCP %s:%d is held by"
                                  " nodepass pid %d (" % (HOST, tunnel, server.pid)), warnings[0]
    assert warnings[0].endswith("): fine if that is the process to reload (SIGHUP); a new"
                                " process could not listen there")


def test_a_data_port_in_use_stops_the_start(busy_tcp):
    line = one_line(run_nodepass([server_url("data_port=%d" % busy_tcp)]), 1)
    assert line == "cannot listen on the data port (data_port=) at TCP %s:%d: Address already" \
        " in use: is another nodepass or service on it? pick another port" % (HOST, busy_tcp)


def test_a_busy_metrics_port_stops_the_start_before_any_tunnel(busy_tcp):
    result = run_nodepass(["--metrics", "%s:%d" % (HOST, busy_tcp), server_url()])
    assert result.stdout == ""  # no "Server: tunnel ..." line: nothing started
    assert one_line(result, 1) == "cannot listen on the metrics port (--metrics) at TCP %s:%d:" \
        " Address already in use: is another nodepass or service on it? pick another port" \
        % (HOST, busy_tcp)


def test_check_fails_for_a_busy_metrics_port(busy_tcp):
    result = run_nodepass(["--check", "--metrics", "%s:%d" % (HOST, busy_tcp), server_url()])
    assert one_line(result, 1).startswith("cannot listen on the metrics port (--metrics) at TCP"
                                          " %s:%d: Address already in use" % (HOST, busy_tcp))


# -- certificates --------------------------------------------------------------------

@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    """A server certificate and its key, another CA's key, and files that are not PEM."""
    folder = tmp_path_factory.mktemp("pems")
    files = make_test_ca(str(folder))
    (folder / "other").mkdir()
    files["other_key"] = make_test_ca(str(folder / "other"))["key"]  # another CA's server key
    files["garbage"] = str(folder / "garbage.crt")
    with open(files["garbage"], "w") as stream:
        stream.write("not a certificate\n")
    from cryptography.hazmat.primitives import serialization
    with open(files["key"], "rb") as stream:
        key = serialization.load_pem_private_key(stream.read(), None)
    files["encrypted"] = str(folder / "encrypted.key")
    with open(files["encrypted"], "wb") as stream:
        stream.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    files["missing"] = str(folder / "missing.pem")
    return files


@pytest.mark.parametrize("crt, key, message", [
    ("key", "crt", "crt={key} holds a private key and key={crt} a certificate: swap crt= and"
                   " key="),
    ("key", "key", "crt={key} holds a private key, not a certificate: crt= takes the"
                   " certificate (or swap crt= and key=)"),
    ("crt", "crt", "key={crt} holds a certificate, not a private key: key= takes the private"
                   " key (or swap crt= and key=)"),
    ("garbage", "key", "crt={garbage} is not a PEM file (no -----BEGIN line), or not a"
                       " certificate: give the certificate in PEM (openssl x509 -inform der -in"
                       " {garbage} -out {garbage}.pem converts a DER one)"),
    ("crt", "other_key", "key={other_key} is not the private key of the certificate in"
                         " crt={crt} (key values mismatch): give the key the certificate was"
                         " made for"),
    ("crt", "encrypted", "key={encrypted} is encrypted with a passphrase, which nodepass cannot"
                         " ask for: store it unencrypted (openssl pkey -in {encrypted} -out"
                         " {encrypted}.plain) with mode 600"),
    ("missing", "key", "cannot read certificate file crt={missing}: No such file or directory"),
])
def test_check_says_which_file_holds_what(pems, crt, key, message):
    url = server_url("tls=2&crt=%s&key=%s" % (pems[crt], pems[key]))
    assert one_line(run_nodepass(["--check", url]), 2) == message.format(**pems)


@pytest.mark.matrix
def test_swapped_crt_and_key_stop_the_start_with_the_same_line(pems):
    url = server_url("tls=2&crt=%s&key=%s" % (pems["key"], pems["crt"]))
    assert one_line(run_nodepass([url]), 2) == "crt=%s holds a private key and key=%s a" \
        " certificate: swap crt= and key=" % (pems["key"], pems["crt"])


# -- a tunnels file that others may read --------------------------------------------

def tunnels_file(tmp_path, mode: int, key: bool = True) -> str:
    path = tmp_path / "tunnels"
    path.write_text("web %s\n" % server_url().replace("://", "://k3y@" if key else "://"))
    path.chmod(mode)
    return str(path)


def test_check_warns_of_a_readable_tunnels_file_holding_a_key(tmp_path):
    path = tunnels_file(tmp_path, 0o644)
    result = run_nodepass(["--check", "--config", path])
    assert result.stdout.startswith("ok: web: ")
    assert one_line(result, 0, "nodepass: warning: ") == \
        "%s is readable by others (mode 0644) and holds a key: chmod 600 %s" % (path, path)


@pytest.mark.parametrize("mode, key", [(0o600, True), (0o640, True), (0o644, False)])
def test_no_warning_for_a_private_file_or_one_without_a_key(tmp_path, mode, key):
    result = run_nodepass(["--check", "--config", tunnels_file(tmp_path, mode, key)])
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_start_and_a_reload_warn_of_a_readable_tunnels_file_holding_a_key(nodepass, tmp_path):
    path = tunnels_file(tmp_path, 0o604)
    process = nodepass(["--config", path])
    process.wait_for_output("Server: tunnel")
    warning = "WARN  %s is readable by others (mode 0604) and holds a key: chmod 600 %s" % (
        path, path)
    assert process.output().count(warning) == 1
    process.send_signal(signal.SIGHUP)  # a reload reads the file again, and says it again
    process.wait_for_output("Reloaded: ")
    assert process.output().count(warning) == 2
