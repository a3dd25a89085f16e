"""A self-signed certificate for TLS tests and benchmarks (bench/ imports this too)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    crypt = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt)


def self_signed(directory: str | Path) -> tuple[str, str]:
    """An EC P-256 certificate for localhost and 127.0.0.1, valid a day: (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), loopback]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(pem(key))
    return str(cert_path), str(key_path)


class Certs:
    """A self-signed certificate for localhost and 127.0.0.1, its key, and a stranger key."""

    def __init__(self, root: Path) -> None:
        cert, key = self_signed(root)
        self.cert, self.key = Path(cert), Path(key)
        self.other_key = root / "other.pem"
        self.other_key.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))

    def flags(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key))

    def client_context(self) -> ssl.SSLContext:
        """A client that really verifies the server against this certificate."""
        return ssl.create_default_context(cafile=str(self.cert))
