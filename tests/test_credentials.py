"""fedsim certs / fedsim keys: credentials that Flower 1.41's own loaders and TLS stacks accept."""

import datetime as dt
import ipaddress
import shlex
import socket
import ssl
import stat
import threading
import tomllib
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.args import try_obtain_root_certificates, try_obtain_server_certificates
from flwr.supercore.constant import SUPERLINK_UVICORN_DEFAULT_PORT
from flwr.supercore.grpc import generic_create_grpc_server
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

# Private to flwr, but exactly what flower-superlink and flower-supernode run on their flags.
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import (
    _parse_args_run_supernode,
    _try_setup_client_authentication,
)

from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.deploy.credentials import (
    Certificates,
    subject_alt_names,
    write_certificates,
    write_supernode_keys,
)

HOSTS = ["10.0.0.5", "SuperLink.example.org", " 2001:db8::7"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return write_certificates(tmp_path_factory.mktemp("certs"), HOSTS, days=30)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _printed(stdout: str, program: str) -> list[list[str]]:
    """Return the arguments of each printed command line that runs ``program``."""
    return [
        shlex.split(line)[1:] for line in stdout.splitlines() if line.startswith(f"  {program} ")
    ]


def test_server_certificate_names_the_hosts_then_loopback(certs: Certificates) -> None:
    names = _load(certs.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["superlink.example.org", "localhost"]
    assert names.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("10.0.0.5", "2001:db8::7", "127.0.0.1", "::1")
    ]


def test_loopback_names_appear_once_whatever_the_spelling() -> None:
    names = subject_alt_names([" LocalHost", "127.0.0.1", "0:0::1"])
    assert names == [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]


def test_server_certificate_is_issued_by_the_ca_for_tls_servers(certs: Certificates) -> None:
    ca, server = _load(certs.ca_cert), _load(certs.server_cert)
    ca.verify_directly_issued_by(ca)  # self-signed
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match

    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_constraints.critical and ca_constraints.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for cert in (ca, server):
        # 30 days from now, starting 5 minutes back for machines whose clocks lag.
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(30, minutes=5)
        assert cert.not_valid_before_utc < dt.datetime.now(dt.UTC) < cert.not_valid_after_utc


def test_keys_are_rsa_4096_owner_only_and_match_their_certificates(certs: Certificates) -> None:
    for key_file, cert_file in (
        (certs.ca_key, certs.ca_cert),
        (certs.server_key, certs.server_cert),
    ):
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
        cert_key = _load(cert_file).public_key()
        assert isinstance(cert_key, rsa.RSAPublicKey)
        assert key.public_key().public_numbers() == cert_key.public_numbers()
        assert _mode(key_file) == 0o600


def _tls_greeting(certs: Certificates, server_hostname: str) -> bytes:
    """Serve one TLS connection on 127.0.0.1 with the SuperLink's files, as uvicorn does.

    The client trusts only ca.crt and checks ``server_hostname``, as the SuperExec
    that a SuperLink starts does when it dials the Runtime API on loopback.
    """
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs.server_cert, certs.server_key)
    client_context = ssl.create_default_context(cafile=certs.ca_cert)  # no system CAs
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"superlink")
            except (ssl.SSLError, OSError):
                pass  # the client refused the certificate

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_context.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                return tls.recv(64)
        finally:
            thread.join(timeout=10)


@pytest.mark.parametrize(
    "name", ["127.0.0.1", "::1", "localhost", "10.0.0.5", "superlink.example.org"]
)
def test_tls_client_trusting_only_the_ca_accepts_each_name(certs: Certificates, name: str) -> None:
    assert _tls_greeting(certs, name) == b"superlink"


def test_tls_client_refuses_a_name_not_in_the_certificate(certs: Certificates) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _tls_greeting(certs, "elsewhere.example.org")


@pytest.mark.parametrize(
    ("name", "ready"),
    [(None, True), ("localhost", True), ("superlink.example.org", True), ("elsewhere.org", False)],
    ids=["127.0.0.1", "localhost", "dns", "wrong-name"],
)
def test_flower_grpc_server_with_the_files_is_reached_over_tls(
    certs: Certificates, name: str | None, ready: bool
) -> None:
    # The same tuple and server factory as the SuperLink's Fleet and Control APIs.
    files = (certs.ca_cert, certs.server_cert, certs.server_key)
    ca, cert, key = (path.read_bytes() for path in files)
    server = generic_create_grpc_server(
        (None, lambda _servicer, _server: None), "127.0.0.1:0", certificates=(ca, cert, key)
    )
    server.start()
    port = server.bound_address.rpartition(":")[2]
    options = [] if name is None else [("grpc.ssl_target_name_override", name)]
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
            connected = grpc.channel_ready_future(channel)
            if ready:
                connected.result(timeout=10)  # the TLS handshake succeeded
            else:
                with pytest.raises(grpc.FutureTimeoutError):
                    connected.result(timeout=1)
    finally:
        server.stop(grace=None)


def test_cli_prints_flags_that_flower_superlink_and_supernode_accept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--hosts", "10.0.0.5,superlink.example.org", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    files = [(out / name).resolve().read_bytes() for name in ("ca.crt", "server.pem", "server.key")]

    [superlink_args] = _printed(printed, "flower-superlink")
    assert superlink_args[::2] == [
        "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--host", "--port"
    ]  # fmt: skip
    superlink = _parse_args_run_superlink().parse_args(superlink_args)
    # One port for the Fleet, Control and Runtime APIs: Flower's default.
    assert superlink.port == SUPERLINK_UVICORN_DEFAULT_PORT == 8000
    assert superlink.host == "0.0.0.0"
    assert list(try_obtain_server_certificates(superlink) or ()) == files
    [supernode_args] = _printed(printed, "flower-supernode")
    supernode = _parse_args_run_supernode().parse_args(supernode_args)
    assert supernode.superlink == "10.0.0.5:8000"
    assert try_obtain_root_certificates(supernode, supernode.superlink) == files[0]
    assert f'root-certificates = "{(out / "ca.crt").resolve()}"' in printed
    # The flwr CLI dials the same address as the SuperNodes.
    assert 'address = "10.0.0.5:8000"' in printed
    assert ":9092" not in printed and ":9093" not in printed
    block = printed[printed.index("  [superlink]") :]
    connections = tomllib.loads("\n".join(line.strip() for line in block.splitlines()))
    default = connections["superlink"]["default"]
    assert connections["superlink"][default]["address"] == "10.0.0.5:8000"


def test_supernode_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    pairs = write_supernode_keys(tmp_path, 3)
    assert [pair.name for pair in pairs] == ["supernode-1", "supernode-2", "supernode-3"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"supernode-{i}{ext}" for i in (1, 2, 3) for ext in ("", ".pub")
    ]
    registered = []
    for pair in pairs:
        assert _mode(pair.private_key) == 0o600
        assert pair.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        flags = ["--auth-supernode-private-key", str(pair.private_key)]
        loaded = _try_setup_client_authentication(_parse_args_run_supernode().parse_args(flags))
        assert loaded is not None
        private, public = loaded
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        # The SuperLink stores the registered key and matches the one the SuperNode derives.
        assert try_load_public_key(pair.public_key) == public_key_to_bytes(public)
        registered.append(public_key_to_bytes(public))
    assert len(set(registered)) == 3


def test_cli_prints_register_commands_and_supernode_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "--out", str(tmp_path), "--nodes", "2"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path.resolve()
    assert _printed(printed, "flwr") == [
        ["supernode", "register", str(out / "supernode-1.pub")],
        ["supernode", "register", str(out / "supernode-2.pub")],
    ]
    for args in _printed(printed, "flower-supernode"):
        assert _try_setup_client_authentication(_parse_args_run_supernode().parse_args(args))
    assert len(_printed(printed, "flower-supernode")) == 2
    assert "--enable-supernode-auth" in printed


@pytest.mark.parametrize(
    ("command", "existing"),
    [(["certs", "--hosts", "10.0.0.5"], "server.key"), (["keys", "--nodes", "2"], "supernode-2")],
    ids=["certs", "keys"],
)
def test_existing_files_are_refused_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], existing: str
) -> None:
    (tmp_path / existing).write_bytes(b"old")
    assert main([*command, "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"fedsim {command[0]}: --out: ") and existing in err
    assert "--overwrite" in err
    assert [path.name for path in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_bytes() == b"old"


def test_overwrite_replaces_a_key_and_makes_it_private(tmp_path: Path) -> None:
    old = tmp_path / "supernode-1"
    old.write_bytes(b"old")
    old.chmod(0o644)
    [pair] = write_supernode_keys(tmp_path, 1, overwrite=True)
    assert pair.private_key == old and old.read_bytes() != b"old" and _mode(old) == 0o600


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["keys", "--nodes", "0"], "--nodes"),
        (["certs", "--hosts", ""], "--hosts"),
        (["certs", "--hosts", "10.0.0.5,"], "--hosts"),
        (["certs", "--hosts", "10.0.0.256"], "--hosts"),
        (["certs", "--hosts", "superlink.example.org:9092"], "--hosts"),
        (["certs", "--hosts", "under_score.org"], "--hosts"),
        (["certs", "--hosts", "10.0.0.5", "--days", "0"], "--days"),
    ],
    ids=["nodes-0", "hosts-empty", "hosts-trailing-comma", "bad-ip", "port", "bad-dns", "days-0"],
)
def test_bad_input_is_one_line_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], flag: str
) -> None:
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"fedsim {args[0]}: {flag}: "), err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    out.write_text("not a folder")
    assert main(["keys", "--nodes", "1", "--out", str(out)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("fedsim keys: --out: ")
