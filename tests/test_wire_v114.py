"""The v1.14 codec (nodepass_gevent.wire.v114) against the contract's worked examples
and the real v1.14.0 captures: our encoders must write the captured bytes exactly,
our parsers must read them back, and garbage must be refused with a clear reason.

All of it is in-process and fast (no sockets), so all of it is in the matrix.
"""

import base64
import json
import re

import pytest
from hypothesis import given, strategies as st

import v114_transcripts as captures
from nodepass_gevent.wire.v114 import gojson, handshake, ids, keys, signals
from nodepass_gevent.wire.v114.handshake import TunnelConfig
from nodepass_gevent.wire.v114.signals import Signal, SignalError, UnknownAction

pytestmark = pytest.mark.matrix

KEY_10101 = b"e68be2b4"  # fnv1a32("10101"): the captures' server port, no user part
PING_LINE = b"HhRZARFbDVpHDBoSDFwFFhg=\n"
PONG_LINE = b"HhRZARFbDVpHDBoSClwFFhg=\n"
TCP_LINE = b"HhRZARFbDVpHDBoWBkJAGEdEXQ8KRgcWXxQJUFIcUhpVGAlYUAdbDVUUFEAMVkAOR1QJU1AHVQJXFEU=\n"


def need(name):
    if not captures.available(name):
        pytest.skip("the v1.14 capture {} is not at {}".format(name, captures.TRANSCRIPTS))
    return name


# -- the contract's worked examples (no captures needed) -----------------------------


@pytest.mark.parametrize("url, key", [
    ("server://127.0.0.1:10101/127.0.0.1:8080", b"e68be2b4"),
    ("client://:10101/x:1", b"e68be2b4"),
    ("server://example.com/x:1", b"811c9dc5"),        # no port: FNV of ""
    ("server://example.com:/x:1", b"811c9dc5"),       # empty port, as Go's URL.Port()
    ("server://[::1]:443/x:1", b"2339c1b2"),
    ("server://h:010101/x:1", keys.derive_key("", "010101")),  # the port as written
    ("server://secret@h:10101/x:1", b"secret"),
    ("server://secret:ignored@h:10101/x:1", b"secret"),
    ("server://s%40c%FF@h:10101/x:1", b"s@c\xff"),   # percent-decoded, raw bytes
    ("server://@h:10101/x:1", b"e68be2b4"),           # an empty user part: the port's hash
])
def test_the_key_is_the_user_part_else_fnv1a32_of_the_port_string(url, key):
    assert keys.key_from_url(url) == key


def test_a_port_is_hashed_as_written_so_a_leading_zero_changes_the_key():
    assert keys.derive_key(None, "010101") != keys.derive_key(None, "10101")


def test_a_bad_percent_escape_in_the_key_is_refused_as_go_url_parse_does():
    with pytest.raises(ValueError, match="percent-escape"):
        keys.key_from_url("server://ab%zz@h:1/x:1")


def test_the_bearer_is_hmac_sha256_of_nothing_under_the_key():
    assert keys.bearer_token(KEY_10101) == \
        "8940572756af096447802f92b4c843ac61de93b80af9d37a85ed994508656d7e"
    secret = keys.bearer_token(b"secret")
    assert (secret[:8], secret[-8:]) == ("f9e66e17", "30196169")


@pytest.mark.parametrize("token, good", [
    ("8940572756af096447802f92b4c843ac61de93b80af9d37a85ed994508656d7e", True),
    ("8940572756AF096447802F92B4C843AC61DE93B80AF9D37A85ED994508656D7E", False),  # hmac.Equal
    ("8940572756af096447802f92b4c843ac61de93b80af9d37a85ed994508656d7", False),
    ("", False), ("\u00e9" * 64, False), ("\u4e00" * 64, False),
])
def test_the_bearer_must_match_byte_for_byte(token, good):
    assert keys.bearer_matches(KEY_10101, token) is good


@pytest.mark.parametrize("signal, key, line", [
    (signals.ping(), KEY_10101, PING_LINE),
    (signals.pong(), KEY_10101, PONG_LINE),
    (signals.flush(), KEY_10101, b"HhRZARFbDVpHDBoECUcRXEdL\n"),
    (signals.ping(), b"secret", b"CEcCEREdHAtBSEcEGgsEUBg=\n"),
    (signals.tcp("127.0.0.1:55990", "b1155762"), KEY_10101, TCP_LINE),
])
def test_signals_encode_to_the_contracts_lines_and_decode_back(signal, key, line):
    assert signals.encode_signal(signal, key) == line
    assert signals.decode_signal(line, key) == signal


def test_signal_json_has_gos_field_order_and_leaves_empty_fields_out():
    assert signals.signal_json(signals.ping()) == b'{"action":"ping"}'
    fp = keys.certificate_fingerprint(b"cert")
    assert signals.signal_json(signals.verify("0000abcd", fp)) == \
        '{{"action":"verify","id":"0000abcd","fp":"{}"}}'.format(fp).encode()
    assert signals.signal_json(Signal("udp", id="0000abcd", remote="[::1]:5")) == \
        b'{"action":"udp","remote":"[::1]:5","id":"0000abcd"}'


def test_json_escapes_what_go_escapes():
    assert gojson.marshal_fields([("a", "<b>&\u2028\u2029\n\x01\u00e9")]) == \
        '{"a":"\\u003cb\\u003e\\u0026\\u2028\\u2029\\n\\u0001\u00e9"}'.encode("utf-8")
    assert gojson.encode_map({"type": "0", "flow": "-", "max": 4}) == \
        b'{"flow":"-","max":4,"type":"0"}\n'


def test_the_fingerprint_is_sha256_in_uppercase_pairs():
    fp = keys.certificate_fingerprint(b"any DER bytes")
    assert fp.startswith("sha256:") and len(fp) - len("sha256:") == 95
    assert keys.is_fingerprint(fp) and not keys.is_fingerprint(fp.lower())


@given(st.sampled_from(signals.ACTIONS), st.text(min_size=1, max_size=40).filter(str.isprintable),
       st.binary(min_size=1, max_size=40))
def test_signals_round_trip_under_any_key(action, remote, key):
    signal = Signal(action, remote=remote, id="0123abcd",
                    fp=keys.certificate_fingerprint(key) if action == "verify" else "")
    assert signals.decode_signal(signals.encode_signal(signal, key), key) == signal


def test_ids_are_four_bytes_named_in_lowercase_hex():
    assert ids.id_name(b"\xb1\x15\x57\x62") == "b1155762"
    assert ids.id_bytes("b1155762") == b"\xb1\x15\x57\x62"
    assert ids.id_name(ids.CONTROL_ID) == ids.CONTROL_NAME == "00000000"
    for bad in ("B1155762", "b115576", "b11557622", "b115576g"):
        with pytest.raises(ValueError):
            ids.id_bytes(bad)
    with pytest.raises(ValueError):
        ids.id_name(b"\x00\x01\x02")


def test_a_new_id_is_never_the_control_id_nor_a_live_one():
    draws = iter([ids.CONTROL_ID, b"\x00\x00\x00\x01", b"\x00\x00\x00\x02"])
    assert ids.new_id({b"\x00\x00\x00\x01"}, lambda n: next(draws)) == b"\x00\x00\x00\x02"
    assert len(ids.new_id()) == 4


@pytest.mark.parametrize("host, sni, name", [
    ("127.0.0.1", "", "none"), ("::1", "", "none"), ("[::1]", "", "none"), ("", "", "none"),
    ("tunnel.example", "", "tunnel.example"), ("127.0.0.1", "tunnel.example", "tunnel.example"),
])
def test_the_host_header_is_none_for_an_ip_unless_sni_names_it(host, sni, name):
    assert handshake.server_name(host, sni) == name


# -- the captures: our bytes are v1.14's -------------------------------------------------


HANDSHAKES = [("tls0.txt", "-"), ("fwd-tls0.txt", "+")]


def handshake_streams(name):
    conn = captures.read_relay_dump(need(name)).connections[1]
    return conn.stream(captures.CLIENT_TO_SERVER), conn.stream(captures.SERVER_TO_CLIENT)


@pytest.mark.parametrize("name, flow", HANDSHAKES)
def test_our_request_is_the_go_clients_byte_for_byte_and_passes(name, flow):
    request, _ = handshake_streams(name)
    assert handshake.encode_request(KEY_10101, "none") == request
    assert handshake.head_end(request) == len(request)
    parsed = handshake.parse_request(request)
    assert (parsed.method, parsed.path, parsed.header("host")) == ("GET", "/", "none")
    assert handshake.judge_request(parsed, KEY_10101) == handshake.OK
    assert handshake.judge_request(parsed, b"secret") == handshake.UNAUTHORIZED


@pytest.mark.parametrize("name, flow", HANDSHAKES)
def test_our_reply_is_the_go_servers_byte_for_byte_and_parses(name, flow):
    _, reply = handshake_streams(name)
    date = re.search(rb"Date: ([^\r]+)\r\n", reply).group(1).decode()
    assert handshake.encode_reply(TunnelConfig(flow, 4, "0", "0"), date) == reply
    parsed = handshake.parse_reply(reply[:-1])
    assert parsed is None  # one byte short of Content-Length: not yet
    parsed = handshake.parse_reply(reply)
    assert (parsed.status, parsed.size, parsed.header("content-type")) == \
        (200, len(reply), "application/json")
    assert handshake.parse_config(parsed.body) == TunnelConfig(flow, 4, "0", "0")


def test_a_date_is_written_as_go_writes_it():
    assert handshake.http_date(1796635141) == "Mon, 07 Dec 2026 09:19:01 GMT"


@pytest.mark.parametrize("case, status", [("wrong bearer", 401), ("no auth", 401),
                                          ("wrong path", 404), ("POST", 405)])
def test_our_refusals_are_the_go_servers_byte_for_byte(case, status):
    reply = captures.read_curl_replies(need("badkey.curl.txt"))[case]
    date = re.search(rb"Date: ([^\r]+)\r\n", reply).group(1).decode()
    assert handshake.encode_refusal(status, date) == reply
    assert handshake.parse_reply(reply).status == status


@pytest.mark.parametrize("method, target, auth, status", [
    ("POST", "/nope", "", 405),     # the method is judged first
    ("HEAD", "/", "", 405),
    ("GET", "/nope", "", 404),      # then the path
    ("GET", "//", "", 404),
    ("GET", "/?x=1", None, 200),    # the query is not part of the path
    ("GET", "http://h/", None, 200),
    ("GET", "/", "", 401),          # then the bearer
    ("GET", "/", "Basic abc", 401),
    ("GET", "/", "bearer " + keys.bearer_token(KEY_10101), 401),
])
def test_requests_are_judged_in_v114s_order(method, target, auth, status):
    auth = "Bearer " + keys.bearer_token(KEY_10101) if auth is None else auth
    head = "{} {} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n".format(method, target, auth)
    assert handshake.judge_request(handshake.parse_request(head.encode()), KEY_10101) == status


@pytest.mark.parametrize("name", ["tls0.txt", "fwd-tls0.txt"])
def test_every_captured_control_line_decodes_and_reencodes_to_the_same_bytes(name):
    transcript = captures.read_relay_dump(need(name))
    control = transcript.control()
    seen = []
    for direction in (captures.CLIENT_TO_SERVER, captures.SERVER_TO_CLIENT):
        stream = control.stream(direction)
        if direction == captures.SERVER_TO_CLIENT:
            assert stream[:4] == ids.CONTROL_ID
            stream = stream[4:]
        lines, rest = signals.split_lines(stream)
        assert rest == b"" and lines
        for line in lines:
            signal = signals.decode_signal(line, KEY_10101)
            assert signals.encode_signal(signal, KEY_10101) == line
            seen.append(signal.action)
    assert {"ping", "pong", "tcp", "udp"} <= set(seen)
    assert seen.count("ping") == seen.count("pong")  # every ping answered


@pytest.mark.parametrize("name", ["tls0.decoded.txt", "fwd-tls0.decoded.txt"])
def test_our_json_is_the_json_the_captures_decode_to(name):
    rows = captures.read_decoded(need(name))
    assert rows
    for _, _, _, line, text in rows:
        signal = signals.decode_signal(line.encode() + b"\n", KEY_10101)
        assert signals.signal_json(signal) == text.encode()


def test_two_lines_in_one_read_are_split_as_two_signals():
    segment = [s for s in captures.read_relay_dump(need("fwd-tls0.txt")).segments
               if s.conn == 3 and len(s.data) == 50][0]
    lines, rest = signals.split_lines(segment.data)
    assert [signals.decode_signal(line, KEY_10101).action for line in lines] == ["ping", "pong"]
    assert rest == b""
    lines, rest = signals.split_lines(segment.data[:30])  # a read can end mid-line
    assert len(lines) == 1 and rest == segment.data[25:30]


@pytest.mark.parametrize("name, who_signals", [("tls0.txt", captures.SERVER_TO_CLIENT),
                                               ("fwd-tls0.txt", captures.CLIENT_TO_SERVER)])
def test_signals_name_connections_by_the_ids_the_server_wrote(name, who_signals):
    transcript = captures.read_relay_dump(need(name))
    control = transcript.control()
    by_id = {}
    for conn in transcript.connections.values():
        if conn is control or conn.number == 1:
            continue
        by_id[ids.id_name(conn.stream(captures.SERVER_TO_CLIENT)[:4])] = conn
    stream = control.stream(who_signals)
    stream = stream[4:] if who_signals == captures.SERVER_TO_CLIENT else stream
    launches = [s for s in (signals.decode_signal(line, KEY_10101)
                            for line in signals.split_lines(stream)[0])
                if s.action in ("tcp", "udp")]
    assert [s.action for s in launches] == ["tcp", "udp"]
    for signal in launches:
        carried = by_id[signal.id]
        user_bytes = carried.stream(who_signals)
        if who_signals == captures.SERVER_TO_CLIENT:
            user_bytes = user_bytes[4:]
        # raw user bytes, no header: the payload and its echo are the same bytes
        assert user_bytes.startswith(b"hello-" + signal.action.encode())
        other = captures.CLIENT_TO_SERVER if who_signals == captures.SERVER_TO_CLIENT \
            else captures.SERVER_TO_CLIENT
        echo = carried.stream(other)
        echo = echo[4:] if other == captures.SERVER_TO_CLIENT else echo
        assert echo == user_bytes


# -- garbage is refused, with a reason ----------------------------------------------------


def line_of(document, key=KEY_10101):
    return base64.b64encode(signals.xor(json.dumps(document).encode(), key)) + b"\n"


@pytest.mark.parametrize("line, reason", [
    (b"not base64!\n", "not base64"),
    (b"HhRZARFbDVpHDBoSDFwFFhg\n", "not base64"),                 # padding required
    (b"\n", "empty"),
    (base64.b64encode(signals.xor(b"{nope", KEY_10101)) + b"\n", "not JSON"),
    (signals.encode_signal(signals.ping(), b"otherkey"), "not JSON"),  # a wrong key
    (line_of(["action", "ping"]), "not a JSON object"),
    (line_of({"action": 5}), "not a string"),
    (line_of({"action": "tcp", "remote": "1.2.3.4:5"}), "without an id"),
    (line_of({"action": "tcp", "id": "0123abcd"}), "without a remote"),
    (line_of({"action": "tcp", "remote": "1.2.3.4:5", "id": "XYZ"}), "8 lowercase hex"),
    (line_of({"action": "verify", "id": "0123abcd", "fp": "md5:00"}), "fingerprint"),
    (line_of({"action": "udp", "remote": "a\nb", "id": "0123abcd"}), "not an address"),
    (b"A" * (signals.MAX_LINE + 1) + b"\n", "at most"),
])
def test_garbage_control_lines_are_refused_with_a_reason(line, reason):
    with pytest.raises(SignalError, match=reason):
        signals.decode_signal(line, KEY_10101)


def test_an_unknown_action_is_its_own_refusal_and_carries_the_signal():
    with pytest.raises(UnknownAction) as refused:
        signals.decode_signal(line_of({"action": "reboot", "extra": 1}), KEY_10101)
    assert refused.value.signal == Signal("reboot")


def test_field_names_match_without_case_and_unknown_fields_are_ignored_as_in_go():
    line = line_of({"ACTION": "tcp", "Remote": "1.2.3.4:5", "id": "0123abcd", "more": [1]})
    assert signals.decode_signal(line, KEY_10101) == signals.tcp("1.2.3.4:5", "0123abcd")
    assert signals.decode_signal(PING_LINE.replace(b"\n", b"\r\n"), KEY_10101) == signals.ping()


def test_a_line_that_never_ends_is_refused_before_it_fills_memory():
    assert signals.split_lines(b"x" * (signals.MAX_LINE - 1)) == ([], b"x" * (signals.MAX_LINE - 1))
    with pytest.raises(SignalError, match="longer than"):
        signals.split_lines(PING_LINE + b"x" * signals.MAX_LINE)


def test_an_endless_head_is_refused_with_gos_431():
    with pytest.raises(handshake.BadRequest) as refused:
        handshake.head_end(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000)
    assert refused.value.status == 431
    assert handshake.encode_bad_request(refused.value) == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; "
        b"charset=utf-8\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large")
    assert handshake.head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") is None  # not yet


@pytest.mark.parametrize("head, reason", [
    (b"\x16\x03\x01\x02\x00\r\n\r\n", "malformed request line"),   # a TLS ClientHello
    (b"GET /\r\n\r\n", "malformed request line"),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "malformed HTTP version"),
    (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", "malformed header"),
    (b"GET / HTTP/1.1\r\nBad Name: x\r\nHost: x\r\n\r\n", "malformed header"),
    (b"GET / HTTP/1.1\r\n\r\n", "missing required Host header"),
])
def test_unparsable_requests_get_gos_own_400(head, reason):
    with pytest.raises(handshake.BadRequest, match=reason) as refused:
        handshake.parse_request(head)
    assert handshake.encode_bad_request(refused.value).startswith(b"HTTP/1.1 400 Bad Request")


def test_only_the_host_400_spells_its_reason_as_go_does():
    assert handshake.encode_bad_request(handshake.BadRequest("missing required Host header")) \
        .split(b"\r\n")[0] == b"HTTP/1.1 400 Bad Request: missing required Host header"
    assert handshake.encode_bad_request(handshake.BadRequest("x")).endswith(b"\r\n\r\n400 Bad Request")


def test_only_v114s_three_refusals_can_be_encoded():
    with pytest.raises(ValueError):
        handshake.encode_refusal(403, "d")


@pytest.mark.parametrize("reply, eof, reason", [
    (b"SSH-2.0-x\r\n\r\n", False, "not an HTTP reply"),
    (b"//10102#0\n", True, "closed before"),   # a v1.0 server's first line, then EOF
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n", False, "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", True, "closed 2 bytes into"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000, False, "longer than"),
])
def test_garbage_replies_are_refused(reply, eof, reason):
    with pytest.raises(handshake.HandshakeError, match=reason):
        handshake.parse_reply(reply, eof)


def test_a_reply_without_length_ends_at_eof():
    reply = b"HTTP/1.1 200 OK\r\n\r\n" + TunnelConfig("-", 8, "1").body()
    assert handshake.parse_reply(reply) is None
    assert handshake.parse_config(handshake.parse_reply(reply, eof=True).body).max == 8


@pytest.mark.parametrize("body, reason", [
    (b"nope", "not JSON"), (b"[]", "not a JSON object"),
    (b'{"flow":"x","max":1,"tls":"0","type":"0"}', "flow"),
    (b'{"flow":"-","max":"4","tls":"0","type":"0"}', "max"),
    (b'{"flow":"-","max":0,"tls":"0","type":"0"}', "max"),
    (b'{"flow":"-","max":true,"tls":"0","type":"0"}', "max"),
    (b'{"flow":"-","max":1,"tls":3,"type":"0"}', "tls"),
    (b'{"flow":"-","max":1,"tls":"0","type":"9"}', "type"),
    (b'{"flow":"-","max":1,"tls":"0"}', "type"),
])
def test_a_reply_config_we_cannot_serve_is_refused(body, reason):
    with pytest.raises(handshake.HandshakeError, match=reason):
        handshake.parse_config(body)


def test_extension_fields_ride_in_the_reply_and_a_go_client_keeps_its_four():
    config = TunnelConfig("-", 1024, "1", "0", (("np_ext", {"udp": "frame"}),))
    body = config.body()
    assert body == b'{"flow":"-","max":1024,"np_ext":{"udp":"frame"},"tls":"1","type":"0"}\n'
    assert handshake.parse_config(body) == config
    go_view = {k: v for k, v in json.loads(body).items() if k in handshake.CONFIG_FIELDS}
    assert go_view == {"flow": "-", "max": 1024, "tls": "1", "type": "0"}


def test_extra_request_headers_sort_in_with_authorization_as_go_writes_them():
    request = handshake.encode_request(KEY_10101, "none", (("X-Np-Ext", "1"),))
    lines = request.split(b"\r\n")
    assert lines[3].startswith(b"Authorization: Bearer ") and lines[4] == b"X-Np-Ext: 1"
    assert lines[5] == b"Accept-Encoding: gzip"


@pytest.mark.parametrize("prefix, verdict", [
    (b"", None), (b"GE", None), (b"GET ", True), (b"GET / HTTP/1.1", True),
    (b"//1", False), (b"\x16\x03", False), (b"POST", False),
])
def test_the_first_bytes_tell_a_v114_client_from_a_silent_v1_client(prefix, verdict):
    assert handshake.starts_like_request(prefix) is verdict
