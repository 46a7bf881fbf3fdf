"""Many tunnels in one process: named logs, a tunnels file, live reload, a
failing tunnel beside healthy ones, certificate replacement, systemd readiness.

Real processes on loopback: one server process and one client process, each
running several tunnels; echo targets in the test process.
"""

import re
import shutil
import signal
import socket

import pytest

from multi_support import (NotifySocket, PacedTransfer, http_get, pem_to_der, port_refuses,
                           served_certificate, statuses, tunnel_ports, wait_states)
from support import (HOST, EchoServer, echo_works, make_test_ca, sha256,
                     tcp_exchange, wait_until)


@pytest.fixture
def echoes():
    started = []

    def make(count):
        servers = [EchoServer() for _ in range(count)]
        started.extend(servers)
        return servers
    yield make
    for server in started:
        server.close()


def server_line(name, ports, query=""):
    return "%s server://%s:%d/%s:%d%s" % (name, HOST, ports["tunnel"], HOST, ports["target"],
                                          query)


def client_line(name, ports, echo, query=""):
    return "%s client://%s:%d/%s:%d%s" % (name, HOST, ports["tunnel"], HOST, echo.port, query)


def write(path, lines):
    path.write_text("# written by the test\n" + "\n".join(lines) + "\n")
    return str(path)


def expect(process, text, timeout=20):
    """Wait for ``text`` in the process's log; the log's end in the failure."""
    try:
        process.wait_for_output(text, timeout)
    except AssertionError as error:
        raise AssertionError("%s\n%s" % (error, process.output()[-4000:])) from None


def wait_echo(port, timeout=20):
    wait_until(lambda: echo_works(port), timeout, interval=0.2,
               what="an echo through port %d" % port)


def test_urls_and_a_file_run_named_tunnels_in_one_process_each(nodepass, echoes, tmp_path):
    ports, targets = tunnel_ports(3), echoes(3)
    config = write(tmp_path / "servers", [server_line("web", ports[0]), server_line("db", ports[1]),
                                          server_line("", ports[2]).strip()])
    server = nodepass(["--config", config], status=True)
    metrics = server.status_port
    client = nodepass(["client://%s:%d/%s:%d" % (HOST, p["tunnel"], HOST, t.port)
                       for p, t in zip(ports, targets)])
    unnamed = "server-%d-%d" % (ports[2]["tunnel"], ports[2]["target"])
    wait_states(metrics, {"web": "up", "db": "up", unnamed: "up"})
    for tunnel in ports:
        payload = b"x" * 100000
        assert tcp_exchange(tunnel["target"], payload) == payload
    assert http_get(metrics, "/healthz") == (200, "ok\n")
    # Every line of a tunnel carries its name; the client's are named after their ports.
    expect(server, "web: Tunnel: client connected from")
    expect(server, unnamed + ": Server: tunnel")
    expect(client, "client-%d-%d: Client: tunnel to" % (ports[1]["tunnel"],
                                                                targets[1].port))
    assert server.stop() == 0 and client.stop() == 0


def test_a_bad_tunnel_refuses_the_whole_set_before_anything_listens(nodepass, tmp_path):
    ports = tunnel_ports(2)
    config = write(tmp_path / "servers", [server_line("good", ports[0]),
                                          server_line("bad", ports[1], "?tls=5")])
    process = nodepass(["--config", config])
    assert process.proc.wait(30) == 2
    assert "tunnel bad (line 3): bad tls value" in process.output()
    assert port_refuses(ports[0]["tunnel"]) and port_refuses(ports[0]["target"])


def test_reload_keeps_an_unchanged_tunnel_drains_a_removed_one_and_replaces_a_changed_one(
        nodepass, echoes, tmp_path):
    ports, targets = tunnel_ports(4), echoes(4)
    a, b, c, d = ports
    servers = tmp_path / "servers"
    write(servers, [server_line("a", a), server_line("b", b), server_line("c", c)])
    clients = write(tmp_path / "clients", [client_line(n, p, t) for n, p, t in
                                           zip("abcd", ports, targets)])
    server = nodepass(["--config", str(servers)], status=True)
    metrics = server.status_port
    client = nodepass(["--config", clients])
    wait_states(metrics, {"a": "up", "b": "up", "c": "up"})
    for tunnel in (a, b, c):
        wait_echo(tunnel["target"])

    # A long transfer through a, and a connection held open through b.
    transfer = PacedTransfer(a["target"], 6 * 1024 * 1024, seconds=9)
    transfer.start()
    held = socket.create_connection((HOST, b["target"]), timeout=10)
    held.sendall(b"before")
    assert held.recv(100) == b"before"

    # Reload 1: b removed (drains), d added.
    write(servers, [server_line("a", a), server_line("c", c), server_line("d", d)])
    server.send_signal(signal.SIGHUP)
    expect(server, "Reloaded: 1 added, 1 removed, 0 changed, 2 unchanged", 20)
    try:
        wait_until(lambda: port_refuses(b["target"]), 10, what="b no longer accepting")
    except AssertionError as error:
        raise AssertionError("%s\n%s" % (error, server.output()[-5000:])) from None
    held.sendall(b"during")  # still served while it drains (SHUTDOWN_TIMEOUT=3s)
    assert held.recv(100) == b"during"
    wait_echo(d["target"])
    held.settimeout(15)
    assert held.recv(100) == b""  # cut at the end of the drain
    held.close()

    # Reload 2: a file that no longer validates changes nothing.
    write(servers, [server_line("a", a), server_line("c", c, "?tls=9"), server_line("d", d)])
    server.send_signal(signal.SIGHUP)
    expect(server, "Reload refused, the running tunnels are kept:", 20)
    assert "tunnel c (line 3): bad tls value '9'" in server.output()

    # Reload 3: c changed (a smaller pool): replaced, and serving again.
    write(servers, [server_line("a", a), server_line("c", c, "?max=8"), server_line("d", d)])
    server.send_signal(signal.SIGHUP)
    expect(server, "Reloaded: 0 added, 0 removed, 1 changed, 2 unchanged", 20)
    wait_states(metrics, {"c": "up"})
    assert statuses(metrics)["c"]["pool_capacity"] == 8
    wait_echo(c["target"])

    received = transfer.result(timeout=60)
    assert transfer.error is None and sha256(received) == sha256(transfer.payload)
    # a was never touched: one client session all along, on both sides.
    assert server.output().count("a: Tunnel: client connected") == 1
    assert client.output().count("a: Client: tunnel to %s:%d open" % (HOST, a["tunnel"])) == 1
    assert statuses(metrics)["a"]["reconnects"] == 0
    assert server.stop() == 0 and client.stop() == 0


def test_a_tunnel_that_cannot_listen_is_retried_while_the_others_serve(nodepass, echoes,
                                                                       tmp_path):
    ports, targets = tunnel_ports(2), echoes(2)
    good, blocked = ports
    servers = tmp_path / "servers"
    write(servers, [server_line("good", good)])
    server = nodepass(["--config", str(servers)], status=True)
    metrics = server.status_port
    client = nodepass(["--config", write(tmp_path / "clients", [
        client_line(n, p, t) for n, p, t in zip(["good", "late"], ports, targets)])])
    wait_states(metrics, {"good": "up"})
    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # free_port's TIME_WAIT
    busy.bind((HOST, blocked["target"]))
    busy.listen()
    try:
        write(servers, [server_line("good", good), server_line("late", blocked)])
        server.send_signal(signal.SIGHUP)
        expect(server, "late: cannot listen", 20)
        assert "late: " in server.output() and "starting it again in" in server.output()
        code, body = http_get(metrics, "/healthz")
        assert code == 503 and "late failed" in body
        wait_echo(good["target"])  # the others never notice
    finally:
        busy.close()
    expect(server, "late: started again", 20)
    wait_states(metrics, {"good": "up", "late": "up"})
    wait_echo(blocked["target"])
    assert http_get(metrics, "/healthz")[0] == 200
    assert server.alive() and client.alive()


def test_a_renewed_certificate_is_served_to_new_data_connections(nodepass, echoes, tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    first, second = (make_test_ca(str(tmp_path / name)) for name in ("one", "two"))
    live = {"crt": str(tmp_path / "live.crt"), "key": str(tmp_path / "live.key")}
    shutil.copy(first["crt"], live["crt"])
    shutil.copy(first["key"], live["key"])
    bundle = tmp_path / "cas.pem"
    bundle.write_text(open(first["ca"]).read() + open(second["ca"]).read())
    [ports], [target] = tunnel_ports(1), echoes(1)
    query = "?tls=2&crt=%s&key=%s" % (live["crt"], live["key"])
    server = nodepass(["--config", write(tmp_path / "servers", [server_line("sec", ports, query)])],
                      env={"RELOAD_INTERVAL": "1s"}, status=True)
    metrics = server.status_port
    client = nodepass(["client://%s:%d/%s:%d?tls=2" % (HOST, ports["tunnel"], HOST, target.port)],
                      env={"SSL_CERT_FILE": str(bundle), "MIN_POOL_CAPACITY": "2"})
    wait_states(metrics, {"sec": "up"}, processes=(server, client))
    wait_echo(ports["target"])
    data_port = statuses(metrics)["sec"]["data_port"]
    assert served_certificate(data_port) == pem_to_der(first["crt"])
    held = socket.create_connection((HOST, ports["target"]), timeout=10)
    held.sendall(b"one")
    assert held.recv(100) == b"one"

    # A broken renewal is refused, on SIGHUP as on the timer: the old one stays.
    with open(live["crt"], "w") as broken:
        broken.write("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    server.send_signal(signal.SIGHUP)
    expect(server, "sec: TLS: keeping the certificate in use", 20)
    assert served_certificate(data_port) == pem_to_der(first["crt"])

    # A good renewal, picked up by RELOAD_INTERVAL (1s) without a signal.
    shutil.copy(second["key"], live["key"])
    shutil.copy(second["crt"], live["crt"])
    expect(server, "sec: TLS: certificate %s reloaded" % live["crt"], 20)
    assert served_certificate(data_port) == pem_to_der(second["crt"])
    held.sendall(b"two")  # the connection made under the old certificate goes on
    assert held.recv(100) == b"two"
    held.close()
    for _ in range(6):  # more than the pool held: new data connections, new certificate
        wait_echo(ports["target"])
    assert client.alive() and "certificate verify failed" not in client.output()


def test_systemd_readiness_reload_and_stop_through_notify_socket(nodepass, echoes, tmp_path):
    ports, targets = tunnel_ports(2), echoes(2)
    server_socket, client_socket = NotifySocket("server"), NotifySocket("client")
    try:
        client = nodepass(["--config", write(tmp_path / "clients", [
            client_line(n, p, t) for n, p, t in zip("xy", ports, targets)])],
            env={"NOTIFY_SOCKET": client_socket.name})
        # Not ready while no server answers.
        assert client_socket.receive(3) is None
        servers = write(tmp_path / "servers", [server_line(n, p) for n, p in zip("xy", ports)])
        server = nodepass(["--config", servers],
                          env={"NOTIFY_SOCKET": server_socket.name, "WATCHDOG_USEC": "400000"})
        ready = server_socket.wait_for("READY=1", 30)
        # Ready = listening; "up" counts those whose client is already connected.
        assert re.search(r"^STATUS=2 of 2 tunnels ready, [012] up$", ready, re.M), ready
        assert "READY=1" in client_socket.wait_for("READY=1", 30)
        assert echo_works(ports[0]["target"]) and echo_works(ports[1]["target"])
        server_socket.wait_for("WATCHDOG=1", 5)
        server_socket.wait_for("WATCHDOG=1", 5)
        server.send_signal(signal.SIGHUP)
        server_socket.wait_for("RELOADING=1", 10)
        server_socket.wait_for("READY=1", 10)
        server.send_signal(signal.SIGTERM)
        server_socket.wait_for("STOPPING=1", 10)
        assert server.proc.wait(20) == 0
        assert client.alive()  # its server went away: it waits for it again
    finally:
        server_socket.close()
        client_socket.close()
