"""TLS for data connections: contexts for both roles, and the self-signed certificate.

Mode 0: plain TCP. Mode 1: TLS with a certificate made in memory at start-up,
not verified by the client. Mode 2: the operator's crt/key; the client
verifies the chain (system trust store, or SSL_CERT_FILE) and the tunnel host.
"""

import datetime
import os
import re
import ssl
import tempfile
import warnings
from typing import Optional, Tuple

# cryptography's last release for an old Python (40 for 3.6, 45 for 3.7, 47
# for 3.8) warns at import that the Python is deprecated: a second stderr
# line for every CLI error. Only that warning is silenced. Its class,
# CryptographyDeprecationWarning (a UserWarning), cannot be named before the
# import that emits it, so the filter matches its message on UserWarning.
warnings.filterwarnings("ignore", message=r"Python 3\.\d+ is no longer supported by the Python"
                        r" core team", category=UserWarning)

from cryptography import x509  # noqa: E402 (after the filter)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from nodepass_gevent.config import TLS_NONE, TLS_SELF_SIGNED, TLS_VERIFIED, Config, ConfigError

# A peer may pass a half-close on as a bare TCP FIN, without close_notify. With
# OpenSSL 3 such an EOF would otherwise poison the session: OpenSSL answers it
# with a fatal decode_error alert, and the answer still flowing the other way
# is cut off. OpenSSL 1.1 needs nothing.
# Pythons before 3.10 lack the constant even when they link OpenSSL 3: its
# value there is SSL_OP_IGNORE_UNEXPECTED_EOF from OpenSSL's own headers.
_OPENSSL_IGNORE_UNEXPECTED_EOF = 0x80
_HALF_CLOSE_OPTIONS = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF",
                              _OPENSSL_IGNORE_UNEXPECTED_EOF
                              if ssl.OPENSSL_VERSION_INFO >= (3,) else 0)


class ServerContext(ssl.SSLContext):
    """An SSLContext that can carry the certificate it presents: Python cannot
    ask a context for its own certificate, and v1.14's verify signal carries its
    fingerprint (wire/v114/keys.py). A subclass, because Python 3.6's SSLContext
    has __slots__ and takes no attributes of its own."""

    leaf_pem = b""
    crt = None  # type: Optional[str]


def server_context(config: Config) -> Optional[ssl.SSLContext]:
    """The server's context for its mode; ConfigError if crt/key do not load."""
    if config.tls_mode == TLS_NONE:
        return None
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    _require_tls_1_2(context)
    context.options |= _HALF_CLOSE_OPTIONS
    _issue_no_session_tickets(context)
    if config.tls_mode == TLS_SELF_SIGNED:
        cert_pem, key_pem = self_signed_pem()
        _load_pem_pair(context, cert_pem, key_pem)
    else:
        _load_files(context, config.crt, config.key)
        cert_pem = _read_pem_file("certificate", "crt", config.crt)
    context.leaf_pem, context.crt = cert_pem, config.crt
    return context


def leaf_certificate(context: ssl.SSLContext) -> bytes:
    """The DER of the certificate a server_context() presents (its chain's first);
    ConfigError if crt= holds no plain CERTIFICATE block."""
    return ssl.PEM_cert_to_DER_cert(_first_pem_block(context.leaf_pem, context.crt))


def _first_pem_block(pem: bytes, crt: Optional[str]) -> str:
    text = pem.decode("ascii", "replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ConfigError("crt=%s holds no '%s' block" % (crt, begin))
    return text[start:stop + len(end)] + "\n"


def require_tls_1_3(context: ssl.SSLContext) -> ssl.SSLContext:
    """Hold a context to TLS 1.3, as NodePass v1.14's pool connections are."""
    if hasattr(ssl, "TLSVersion"):  # 3.7+
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1 | ssl.OP_NO_TLSv1_2
    return context


def client_context(tls_mode: int) -> Optional[ssl.SSLContext]:
    """The client's context for the mode the server announced."""
    if tls_mode == TLS_NONE:
        return None
    if tls_mode == TLS_VERIFIED:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.options |= _HALF_CLOSE_OPTIONS
    return context


def _issue_no_session_tickets(context: ssl.SSLContext) -> None:
    """No TLS 1.3 session tickets: neither this project's client nor v1.0's (Go,
    no session cache) resumes a session, and the two tickets OpenSSL sends
    after every handshake cost about a third of a data connection's TLS CPU
    (scripts/tls-ab --handshakes). Pythons before 3.8 cannot say so; they
    keep sending them."""
    if hasattr(context, "num_tickets"):
        context.num_tickets = 0


def _require_tls_1_2(context: ssl.SSLContext) -> None:
    if hasattr(context, "minimum_version"):  # 3.7 on; the options are deprecated there
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:  # 3.6: the same floor, said the old way
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1


def self_signed_pem(common_name: str = "nodepass") -> Tuple[bytes, bytes]:
    """A fresh EC key and a one-year certificate for it, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _load_pem_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl loads certificates only from files: write a private temporary file,
    # load it, and remove it at once so the key never outlives start-up on disk.
    with tempfile.TemporaryDirectory(prefix="nodepass-tls-") as folder:
        path = os.path.join(folder, "self-signed.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as pem:
            pem.write(cert_pem + key_pem)
        context.load_cert_chain(path)


def _load_files(context: ssl.SSLContext, crt: str, key: str) -> None:
    """crt= and key= into the context, or ConfigError saying which file holds what.

    OpenSSL's own errors ("[SSL] PEM lib (_ssl.c:3905)") name neither the file
    nor the mistake, so the files are looked at first: a key where the
    certificate belongs (or the other way round), a file that is not PEM, an
    encrypted key (OpenSSL would prompt for its passphrase on the terminal).
    """
    crt_pem = _read_pem_file("certificate", "crt", crt)
    key_pem = _read_pem_file("private key", "key", key)
    problem = _misplaced_pem(crt, crt_pem, key, key_pem)
    if problem:
        raise ConfigError(problem)
    try:
        context.load_cert_chain(crt, key, password=_no_passphrase)
    except ConfigError:
        raise
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper() or "key values mismatch" in str(exc):
            raise ConfigError("key=%s is not the private key of the certificate in crt=%s (key"
                              " values mismatch): give the key the certificate was made for"
                              % (key, crt)) from None
        raise ConfigError("cannot load certificate crt=%s with key=%s: %s"
                          % (crt, key, reason)) from None


_PEM_LABEL = re.compile(br"-----BEGIN ([A-Z0-9 ]+)-----")
_CERTIFICATE_LABELS = {"CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CERTIFICATE"}
_ENCRYPTED_MARKS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def _read_pem_file(label: str, parameter: str, path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as exc:
        raise ConfigError("cannot read %s file %s=%s: %s"
                          % (label, parameter, path, exc.strerror or exc)) from None


def _holds(pem: bytes) -> Tuple[bool, bool, set]:
    """(a certificate?, a private key?, every PEM label) of a file's bytes."""
    labels = {match.group(1).decode("ascii") for match in _PEM_LABEL.finditer(pem)}
    return (bool(labels & _CERTIFICATE_LABELS),
            any(name.endswith("PRIVATE KEY") and name != "OPENSSH PRIVATE KEY"
                for name in labels), labels)


def _misplaced_pem(crt: str, crt_pem: bytes, key: str, key_pem: bytes) -> Optional[str]:
    """Why crt= and key= cannot make a pair, told from their PEM labels (None: try them)."""
    crt_has_cert, crt_has_key, crt_labels = _holds(crt_pem)
    key_has_cert, key_has_key, key_labels = _holds(key_pem)
    if not crt_has_cert and crt_has_key and key_has_cert and not key_has_key:
        return ("crt=%s holds a private key and key=%s a certificate: swap crt= and key="
                % (crt, key))
    if not crt_has_cert:
        return "crt=%s %s" % (crt, _not_what_it_should_be(crt_labels, crt_has_key, "certificate",
                                                         "crt", crt))
    if not key_has_key:
        return "key=%s %s" % (key, _not_what_it_should_be(key_labels, key_has_cert,
                                                         "private key", "key", key))
    if any(mark in key_pem for mark in _ENCRYPTED_MARKS):
        return ("key=%s is encrypted with a passphrase, which nodepass cannot ask for: store it"
                " unencrypted (openssl pkey -in %s -out %s.plain) with mode 600" % (key, key, key))
    return None


def _not_what_it_should_be(labels: set, holds_the_other: bool, wanted: str, parameter: str,
                           path: str) -> str:
    other = "a certificate" if wanted == "private key" else "a private key"
    if holds_the_other:
        return ("holds %s, not a %s: %s= takes the %s (or swap crt= and key=)"
                % (other, wanted, parameter, wanted))
    if not labels:
        convert = "x509" if wanted == "certificate" else "pkey"
        return ("is not a PEM file (no -----BEGIN line), or not a %s: give the %s in PEM"
                " (openssl %s -inform der -in %s -out %s.pem converts a DER one)"
                % (wanted, wanted, convert, path, path))
    return "holds %s, not a %s" % (" and ".join(sorted(labels)), wanted)


def _no_passphrase() -> bytes:
    """load_cert_chain's password callback: never a prompt on the terminal."""
    raise ConfigError("the private key is encrypted with a passphrase, which nodepass cannot"
                      " ask for: store it unencrypted")


_NAME_ABBREVIATIONS = {"commonName": "CN", "organizationName": "O",
                       "organizationalUnitName": "OU", "countryName": "C"}


def describe_certificate(certificate: dict) -> str:
    """A verified peer certificate (ssl's getpeercert()) in a few words for the
    log: 'CN=example.org, issued by CN=Example CA, valid until Jan 1 2027'."""
    def name(field: str) -> str:
        parts = ["%s=%s" % (_NAME_ABBREVIATIONS.get(key, key), value)
                 for rdn in certificate.get(field, ()) for key, value in rdn
                 if key in _NAME_ABBREVIATIONS]
        return ", ".join(parts) or "?"
    return "%s, issued by %s, valid until %s" % (name("subject"), name("issuer"),
                                                 certificate.get("notAfter", "?"))
