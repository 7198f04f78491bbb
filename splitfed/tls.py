"""TLS for the data plane: the split server's certificate and the CA clients verify it with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["TLSCredentials", "TLSError"]

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY = b"PRIVATE KEY-----"


class TLSError(ValueError):
    """TLS material is missing or is not what it should be."""


@dataclass(frozen=True, repr=False)
class TLSCredentials:
    """The split server's TLS identity, as PEM bytes.

    Parameters
    ----------
    certificate_chain : bytes
        The split server's certificate (then any intermediates). Its subject alternative names
        must cover the address clients dial (``split-server-advertised-address``).
    private_key : bytes
        The certificate's private key.
    root_certificates : bytes
        The CA certificate(s) that signed ``certificate_chain``. Clients receive it inside
        Flower's ``train`` message, which Flower's own TLS protects, and verify the split
        server against it.
    """

    certificate_chain: bytes
    private_key: bytes
    root_certificates: bytes

    def __post_init__(self) -> None:
        for name, marker in (
            ("certificate_chain", _PEM_CERTIFICATE),
            ("private_key", _PEM_PRIVATE_KEY),
            ("root_certificates", _PEM_CERTIFICATE),
        ):
            value = getattr(self, name)
            if not isinstance(value, bytes) or marker not in value:
                raise TLSError(
                    f"{name} is not a PEM {'private key' if 'key' in name else 'certificate'}; "
                    "pass the contents of the .pem/.crt/.key file (bytes), e.g. from "
                    "TLSCredentials.from_files(...)"
                )

    @classmethod
    def from_files(
        cls, *, certfile: str | Path, keyfile: str | Path, ca_certfile: str | Path
    ) -> TLSCredentials:
        """Read the three PEM files (the names follow Flower's ``--ssl-*`` flags)."""
        contents = []
        for flag, path in (
            ("certfile", certfile),
            ("keyfile", keyfile),
            ("ca_certfile", ca_certfile),
        ):
            try:
                contents.append(Path(path).read_bytes())
            except OSError as err:
                raise TLSError(
                    f"cannot read the split server's {flag} {str(path)!r}: {err.strerror}. "
                    "Give a path readable by the process that runs the ServerApp"
                ) from err
        return cls(*contents)

    def __repr__(self) -> str:  # never print the private key
        return "TLSCredentials(certificate_chain=..., private_key=<hidden>, root_certificates=...)"
