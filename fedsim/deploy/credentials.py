"""Credentials for a Flower deployment: the SuperLink's TLS certificates, the SuperNodes' keys.

``write_certificates`` writes the four files of Flower's own credentials script
(``examples/flower-authentication/generate_creds.py``), under the names Flower's
guides use:

``ca.crt``
    A self-signed CA certificate, trusted by everyone who connects to the SuperLink:
    ``flower-supernode --root-certificates``, the ``root-certificates`` key (an
    absolute path) of a SuperLink connection in the flwr CLI's
    ``$FLWR_HOME/config.toml``, and the SuperLink itself. ``flower-superlink
    --ssl-ca-certfile`` hands it to ``grpc.ssl_server_credentials`` as root
    certificates (client certificates are not required) and, as
    ``--root-certificates``, to the SuperExec that it starts, which dials the
    SuperLink's HTTPS Runtime API on loopback (127.0.0.1:8000 by default; a
    bind-all address is rewritten to 127.0.0.1 or ::1). That is why the server
    certificate always names 127.0.0.1, ::1 and localhost.
``ca.key``
    The CA's private key. Flower never reads it; it signs a new server certificate
    when the hosts change. Keep it off the federation's machines.
``server.pem``, ``server.key``
    The SuperLink's certificate, signed by the CA, and its private key, for
    ``flower-superlink --ssl-certfile`` and ``--ssl-keyfile``. Its subjectAltName
    lists every name under which SuperNodes and users reach the SuperLink: TLS
    clients check the name they dialled against it, never the common name (RFC 6125).

Keys are RSA 4096 with SHA-256 signatures, as in Flower's script: that is the kind
of certificate Flower's examples run on. An EC P-384 key would be as welcome to gRPC
(BoringSSL) and to uvicorn (Python's ``ssl``) and quicker to make, but an RSA key
takes under a second, once. Private keys are unencrypted PKCS#8 PEM because Flower
passes the file's bytes to gRPC and the path to uvicorn, and gives neither a
passphrase.

``write_supernode_keys`` writes one ECDSA P-384 key pair per SuperNode in OpenSSH
format, what ``ssh-keygen -t ecdsa -b 384`` writes:

``supernode-<i>``
    The private key, for ``flower-supernode --auth-supernode-private-key``, which
    loads it with ``load_ssh_private_key`` and refuses anything but an EC key. The
    SuperNode derives its public key from it and signs its requests with it.
``supernode-<i>.pub``
    The public key, for ``flwr supernode register``, which loads it with
    ``load_ssh_public_key`` and accepts EC keys on NIST curves only. A SuperLink
    started with ``--enable-supernode-auth`` admits only SuperNodes registered this
    way (and refuses their own registration over the Fleet API).

Private keys are created with mode 0600, and no file is replaced unless asked: a
replaced CA or key silently locks out every machine that holds the old one.
"""

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
# Always in the server certificate: the SuperLink's own SuperExec dials it on loopback.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
RSA_KEY_BITS = 4096
MAX_DAYS = 36_500  # a century: any more is a typo
# Certificates start a little in the past, so that a machine whose clock lags accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class CredentialsError(ValueError):
    """Bad input to a credentials writer; ``option`` names the argument (and CLI flag) at fault."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option, self.reason = option, reason


@dataclass(frozen=True)
class Certificates:
    """The files written by ``write_certificates``."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        """Return the ``flower-superlink`` flags that enable TLS with these files."""
        return [
            "--ssl-ca-certfile", str(self.ca_cert),
            "--ssl-certfile", str(self.server_cert),
            "--ssl-keyfile", str(self.server_key),
        ]  # fmt: skip


@dataclass(frozen=True)
class KeyPair:
    """One SuperNode's key files, written by ``write_supernode_keys``."""

    name: str
    private_key: Path
    public_key: Path


def write_certificates(
    out: Path, hosts: Sequence[str], *, days: int = 365, overwrite: bool = False
) -> Certificates:
    """Write a CA and a SuperLink certificate for ``hosts`` (and loopback) into ``out``.

    Parameters
    ----------
    out : Path
        Folder for the files, created if missing.
    hosts : Sequence[str]
        DNS names and IP addresses under which the SuperLink is reached.
    days : int
        Validity of both certificates.
    overwrite : bool
        Replace files already in ``out``; without it, any one of them is an error.

    Returns
    -------
    Certificates
        The paths of ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key``.

    Raises
    ------
    CredentialsError
        For a bad host, ``days`` out of range, or files in the way; nothing is written.
    """
    names = subject_alt_names(hosts)
    if not 1 <= days <= MAX_DAYS:
        raise CredentialsError("days", f"expected 1 to {MAX_DAYS} days, got {days}")
    out = Path(out)
    certs = Certificates(*(out / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)))
    _check_free(out, [certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key], overwrite)

    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    ca_cert = _ca_certificate(ca_key, now=now, days=days)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    server_cert = _server_certificate(server_key, names, ca_key, ca_cert, now=now, days=days)

    out.mkdir(parents=True, exist_ok=True)
    _write(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(certs.ca_key, _pkcs8(ca_key), secret=True)
    _write(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(certs.server_key, _pkcs8(server_key), secret=True)
    return certs


def write_supernode_keys(out: Path, nodes: int, *, overwrite: bool = False) -> list[KeyPair]:
    """Write ``nodes`` ECDSA P-384 key pairs in OpenSSH format into ``out``.

    Parameters
    ----------
    out : Path
        Folder for the files, created if missing.
    nodes : int
        Number of SuperNodes; pair ``i`` is ``supernode-<i>`` and ``supernode-<i>.pub``.
    overwrite : bool
        Replace files already in ``out``; without it, any one of them is an error.

    Returns
    -------
    list[KeyPair]
        One key pair per SuperNode, numbered from 1.

    Raises
    ------
    CredentialsError
        For ``nodes`` below 1 or files in the way; nothing is written.
    """
    if nodes < 1:
        raise CredentialsError("nodes", f"expected at least 1 SuperNode, got {nodes}")
    out = Path(out)
    pairs = [
        KeyPair(f"supernode-{i}", out / f"supernode-{i}", out / f"supernode-{i}.pub")
        for i in range(1, nodes + 1)
    ]
    _check_free(
        out, [path for pair in pairs for path in (pair.private_key, pair.public_key)], overwrite
    )

    out.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(pair.private_key, private, secret=True)
        # The name as the key's comment, where ssh-keygen puts user@host.
        _write(pair.public_key, public + f" {pair.name}\n".encode(), secret=False)
    return pairs


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Return ``hosts`` and then 127.0.0.1, ::1 and localhost as subjectAltNames, each once.

    An entry that parses as an IP address (``ipaddress``) becomes an IP name, any
    other must be a DNS name (letters, digits and hyphens in dot-separated labels),
    and is lower-cased.
    """
    given = [hosts] if isinstance(hosts, str) else list(hosts)
    if not given or not all(host.strip() for host in given):
        raise CredentialsError(
            "hosts",
            "expected a comma-separated list of DNS names or IP addresses, "
            f"got {','.join(given)!r}",
        )
    names: list[x509.GeneralName] = []
    for host in [*given, *LOOPBACK_HOSTS]:
        name = _general_name(host.strip())
        if name not in names:
            names.append(name)
    return names


def _general_name(host: str) -> x509.GeneralName:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise CredentialsError("hosts", f"{host!r}: a scoped IPv6 address cannot be certified")
        return x509.IPAddress(address)
    name = host.lower()
    labels = name.split(".")
    # An all-digit last label is a mistyped IPv4 address (no top-level domain is numeric).
    if len(name) <= 253 and all(map(_DNS_LABEL.fullmatch, labels)) and not labels[-1].isdigit():
        return x509.DNSName(name)
    hint = " (give the bare host: no port, brackets or scheme)" if set(host) & set(":/[]") else ""
    raise CredentialsError("hosts", f"{host!r} is neither an IP address nor a DNS name{hint}")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsim"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, key: rsa.RSAPrivateKey, issuer: x509.Name, *, now: dt.datetime, days: int
) -> x509.CertificateBuilder:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(key: rsa.RSAPrivateKey, *, now: dt.datetime, days: int) -> x509.Certificate:
    name = _name("fedsim deployment CA")
    return (
        _builder(name, key, name, now=now, days=days)
        # path_length=0: this CA signs server certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: rsa.RSAPrivateKey,
    names: list[x509.GeneralName],
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    *,
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    ca_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(_name("fedsim SuperLink"), key, ca_cert.subject, now=now, days=days)
        # The authority key identifier is required by strict verifiers (Python 3.13's ssl).
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_id), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _pkcs8(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_free(out: Path, paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse, before any key is made, to write where a file exists, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise CredentialsError("out", f"{out} exists and is not a folder")
    taken = [path.name for path in paths if os.path.lexists(path)]
    if taken and not overwrite:
        shown = ", ".join(taken[:4]) + (f" and {len(taken) - 4} more" if len(taken) > 4 else "")
        raise CredentialsError("out", f"{out} already holds {shown}; use --overwrite to replace")


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Write ``data`` to a new file, readable by its owner only if ``secret``.

    The mode is given at creation, so a key is never readable by others, even
    briefly; an existing file (let through by ``overwrite``) is removed first.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
