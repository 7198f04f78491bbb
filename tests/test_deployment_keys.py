"""The certificates and SuperNode keys that ``simulation.launch.deployment`` makes are what TLS
clients and Flower accept (fast: no Flower process is started)."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from simulation.launch.deployment import make_deployment_certificates, make_supernode_keys


def handshake(certfile, keyfile, cafile, server_hostname: str) -> None:
    """A TLS handshake on loopback: a server with ``certfile``, a client trusting ``cafile``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certfile, keyfile)
    client_context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        server = threading.Thread(target=serve)
        server.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                client_context.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"x")
        finally:
            server.join(timeout=5)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "server.lab"])
@pytest.mark.parametrize("which", ["superlink", "split_server"])
def test_both_server_certificates_verify_against_the_ca(tmp_path, which, host):
    files = make_deployment_certificates(
        tmp_path, superlink_hosts=["server.lab"], split_server_hosts=["server.lab"]
    )
    certfile, keyfile = getattr(files, f"{which}_cert"), getattr(files, f"{which}_key")
    handshake(certfile, keyfile, files.ca_cert, server_hostname=host)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(certfile, keyfile, files.ca_cert, server_hostname="elsewhere.lab")
    assert oct(keyfile.stat().st_mode & 0o777) == "0o600"


def test_a_certificate_from_another_ca_is_refused(tmp_path):
    ours = make_deployment_certificates(tmp_path / "ours")
    theirs = make_deployment_certificates(tmp_path / "theirs")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(theirs.superlink_cert, theirs.superlink_key, ours.ca_cert, "127.0.0.1")


def test_supernode_keys_are_what_flower_reads(tmp_path):
    keys = make_supernode_keys(tmp_path, "supernode-0")
    private_key = load_ssh_private_key(keys.private_key.read_bytes(), None)  # as flower-supernode
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert private_key.curve.name == "secp384r1"
    # `flwr supernode register` reads the public key file into the bytes the SuperLink stores.
    assert try_load_public_key(keys.public_key) == public_key_to_bytes(private_key.public_key())
    assert oct(keys.private_key.stat().st_mode & 0o777) == "0o600"
