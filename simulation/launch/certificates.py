"""Make a private CA and TLS certificates for the SuperLink and the split server.

    python -m simulation.launch.certificates --out certs --host 10.0.0.5 --host server.lab

writes ``ca.crt``/``ca.key`` and, signed by that CA, ``server.crt``/``server.key`` valid for
``localhost``, ``127.0.0.1`` and every ``--host``. One certificate serves both planes when the
SuperLink and the ServerApp (the split server) run on the same machine, as they do in Flower.
For production, use your organisation's CA; this is for labs and tests.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CertificateFiles", "issue_certificate", "make_certificates"]


@dataclass(frozen=True)
class CertificateFiles:
    """Paths of the PEM files :func:`make_certificates` wrote."""

    ca_certfile: Path
    certfile: Path
    keyfile: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_certificates(
    out_dir: Path, *, hosts: list[str] | None = None, days: int = 30
) -> CertificateFiles:
    """Write a new CA and a server certificate it signs into ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Created if missing; existing files of the same names are replaced.
    hosts : list[str] | None (default: None)
        Names and IP addresses the server certificate is valid for, besides ``localhost`` and
        ``127.0.0.1``: every address clients dial (the SuperLink's, the split server's
        advertised one).
    days : int (default: 30)
        Validity of both certificates.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("flwr-splitfed CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_certfile = out_dir / "ca.crt"
    ca_keyfile = out_dir / "ca.key"
    ca_certfile.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_keyfile, ca_key)
    certfile, keyfile = issue_certificate(
        ca_certfile=ca_certfile,
        ca_keyfile=ca_keyfile,
        certfile=out_dir / "server.crt",
        keyfile=out_dir / "server.key",
        hosts=hosts,
        days=days,
    )
    return CertificateFiles(ca_certfile=ca_certfile, certfile=certfile, keyfile=keyfile)


def issue_certificate(
    *,
    ca_certfile: Path,
    ca_keyfile: Path,
    certfile: Path,
    keyfile: Path,
    hosts: list[str] | None = None,
    common_name: str = "flwr-splitfed server",
    days: int = 30,
) -> tuple[Path, Path]:
    """Write a new server key and a certificate for it signed by the CA in the given files.

    Parameters
    ----------
    ca_certfile, ca_keyfile : Path
        The CA's certificate and private key (PEM), e.g. from :func:`make_certificates`.
    certfile, keyfile : Path
        Where the certificate and its private key are written.
    hosts : list[str] | None (default: None)
        Names and IP addresses it is valid for, besides ``localhost`` and ``127.0.0.1``.
    common_name : str (default: "flwr-splitfed server")
        The certificate's subject.
    days : int (default: 30)
        Validity.

    Returns
    -------
    tuple[Path, Path]
        ``(certfile, keyfile)``.
    """
    ca_cert = x509.load_pem_x509_certificate(Path(ca_certfile).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(ca_keyfile).read_bytes(), password=None)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_subject_alternative_names(hosts or []), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    Path(certfile).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(Path(keyfile), server_key)
    return Path(certfile), Path(keyfile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.launch.certificates",
        description="Make a private CA and a server certificate signed by it.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the PEM files")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or IP clients dial; repeat for several (localhost, 127.0.0.1 always in)",
    )
    parser.add_argument("--days", type=int, default=30, help="validity (default: 30)")
    args = parser.parse_args(argv)
    files = make_certificates(args.out, hosts=args.host, days=args.days)
    print(f"CA certificate:     {files.ca_certfile}  (give to every client)")
    print(f"server certificate: {files.certfile}")
    print(f"server key:         {files.keyfile}  (keep on the server)")
    print(f"CA key:             {args.out / 'ca.key'}  (keep offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
