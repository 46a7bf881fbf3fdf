"""Signal and id encoding: pure functions, table-driven, plus any-bytes fuzzing."""

import glob
import os
import re

import pytest
from hypothesis import given, strategies as st

from nodepass_gevent.wire.v1 import protocol
from nodepass_gevent.wire.v1.protocol import ProtocolError

pytestmark = pytest.mark.matrix  # the core suite, run on every Python


def test_encodings_are_v1_bytes():
    assert protocol.encode_tunnel_signal(4321, 1) == b"//4321#1\n"
    assert protocol.encode_launch_signal("0a1b2c3d", protocol.KIND_TCP) == b"//0a1b2c3d#1\n"
    assert protocol.encode_launch_signal("0a1b2c3d", protocol.KIND_UDP) == b"//0a1b2c3d#2\n"
    assert protocol.HEARTBEAT == b"\n"
    assert protocol.encode_tunnel_signal(4321, 0, udp_flow=True) == b"//4321?udp=flow#0\n"
    assert protocol.offers_udp_flow(protocol.parse_signal(b"//4321?udp=flow#0\n"))
    assert not protocol.offers_udp_flow(protocol.parse_signal(b"//4321#0\n"))


def test_extension_lines_are_the_bytes_docs_protocol_md_shows():
    """Every line of the key handshake and the flow offer, byte for byte (auth.py
    only adds the MACs to these)."""
    nonce, mac = "0" * protocol.AUTH_NONCE_LENGTH, "f" * protocol.AUTH_MAC_LENGTH
    assert protocol.encode_auth_challenge(nonce) == \
        b"//0?auth=hmac-sha256&nonce=" + nonce.encode() + b"#0\n"
    assert protocol.AUTH_REJECTION == b"//0?error=auth#0\n"
    assert protocol.encode_auth_response(nonce, mac) == \
        b"//" + nonce.encode() + b"?mac=" + mac.encode() + b"#auth\n"
    assert protocol.encode_tunnel_signal(4321, 2, mac=mac) == \
        b"//4321?auth=hmac-sha256&mac=" + mac.encode() + b"#2\n"
    assert protocol.encode_tunnel_signal(4321, 1, udp_flow=True, mac=mac) == \
        b"//4321?auth=hmac-sha256&mac=" + mac.encode() + b"&udp=flow#1\n"
    assert protocol.ACK_UDP_FLOW == b"//flow#udp\n"
    assert protocol.encode_launch_signal("0a1b2c3d", protocol.KIND_UDP_FLOW) == b"//0a1b2c3d#3\n"
    assert protocol.FLOW_FRAME_HEADER.pack(258) == b"\x01\x02"
    challenge = protocol.parse_signal(protocol.encode_auth_challenge(nonce))
    assert protocol.is_auth_challenge(challenge) and not protocol.is_auth_rejection(challenge)
    assert protocol.is_auth_rejection(protocol.parse_signal(protocol.AUTH_REJECTION))


def test_tls_modes_are_the_tunnel_signal_fragments():
    assert [protocol.is_tls_mode(text) for text in ("0", "1", "2", "3", "", "01", " 1")] == \
        [True, True, True, False, False, False, False]
    assert sorted(protocol.TLS_MODE_NAMES) == list(protocol.TLS_MODES) == [0, 1, 2]


def test_new_ids_are_eight_lowercase_hex():
    ids = {protocol.new_connection_id() for _ in range(1000)}
    assert len(ids) > 990
    assert all(protocol.is_connection_id(i) for i in ids)


@pytest.mark.parametrize("line, host, kind, query", [
    (b"//4321#0\n", "4321", "0", {}),
    (b"  //0a1b2c3d#1\r\n", "0a1b2c3d", "1", {}),
    (b"//0a1b2c3d#2", "0a1b2c3d", "2", {}),
    (b"//4321?auth=hmac#2\n", "4321", "2", {"auth": "hmac"}),
    (b"//0a1b2c3d#9\n", "0a1b2c3d", "9", {}),
    # Split the same on every Python: '&' only (3.6.12 and older took ';' too),
    # and a bracketed IPv4 host is read, not refused (urlsplit refuses it from 3.11).
    (b"//4321?udp=flow;x=1&a=b#0\n", "4321", "0", {"udp": "flow;x=1", "a": "b"}),
    (b"//[1.2.3.4]#1\n", "1.2.3.4", "1", {}),
])
def test_signals_parse(line, host, kind, query):
    signal = protocol.parse_signal(line)
    assert (signal.host, signal.kind, signal.query) == (host, kind, query)


@pytest.mark.parametrize("line", [
    b"", b"\n", b"garbage\n", b"4321#1\n", b"//#1\n", b"//[::1#1\n", b"//a b#1\n",
    b"\xff\xfe//x#1\n", b"//" + b"a" * 5000 + b"#1\n",
])
def test_bad_signals_are_rejected(line):
    with pytest.raises(ProtocolError):
        protocol.parse_signal(line)


@pytest.mark.parametrize("line", [b"//abc#1\n", b"//0#1\n", b"//70000#1\n", b"//4321#3\n",
                                  b"//4321\n"])
def test_bad_tunnel_signals_are_rejected(line):
    with pytest.raises(ProtocolError):
        protocol.parse_tunnel_signal(line)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_rejected_cleanly(data):
    for parse in (protocol.parse_signal, protocol.parse_tunnel_signal):
        try:
            signal = parse(data)
        except ProtocolError:
            continue
        assert signal.host


@given(st.integers(1, 65535), st.sampled_from([0, 1, 2]))
def test_tunnel_signal_round_trips(port, tls):
    signal = protocol.parse_tunnel_signal(protocol.encode_tunnel_signal(port, tls))
    assert (int(signal.host), int(signal.kind)) == (port, tls)


def test_every_citation_of_the_wire_contract_names_a_section_of_docs_protocol_md():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "docs", "protocol.md")) as contract:
        headings = {line.lstrip("#").strip().lower() for line in contract
                    if line.startswith("#")}
    cited = {}
    sources = [path for folder in ("nodepass_gevent", "tests", "scripts")
               for path in glob.glob(os.path.join(repo, folder, "**", "*"), recursive=True)
               if os.path.isfile(path) and not path.endswith(".pyc")]
    for path in sources:
        with open(path, encoding="utf-8") as source:
            text = source.read()
        assert "PROTOCOL" ".md" not in text, path  # the shared folder's copy: not in the repo
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", text)  # a title may wrap onto a comment line
        for title in re.findall(r"docs/protocol\.md, [\"']([^\"']+)[\"']", text):
            cited.setdefault(title.lower(), path)
    assert len(cited) >= 3
    assert {title: path for title, path in cited.items() if title not in headings} == {}


@pytest.mark.parametrize("line", [b"//cafe0001#1\n", b"//cafe0001#2", b"//0123abcd#3\r\n",
                                  b"//cafe0001#9\n"])
def test_the_launch_signal_shortcut_parses_as_the_general_path_does(line):
    assert protocol.parse_signal(line) == protocol.parse_any_signal(line)
