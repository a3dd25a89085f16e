"""The server's TLS context from certificate and key files: every bad file is named."""

from __future__ import annotations

import ssl

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from manydoors.server.tls import TlsError, server_context
from support.certfix import pem


def test_server_context_names_the_bad_file(certs, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(pem(ec.generate_private_key(ec.SECP256R1()), b"secret"))
    cert, key = str(certs.cert), str(certs.key)
    cases = {
        (str(junk), key): f"the certificate {junk} holds no PEM certificate",
        (cert, str(junk)): f"the private key {junk} holds no PEM private key",
        (cert, str(encrypted)): f"the private key {encrypted} is encrypted",
        (cert, cert): f"the private key {cert} holds no PEM private key",
        (str(tmp_path), key): f"cannot read the certificate {tmp_path}: Is a directory",
    }
    for (c, k), message in cases.items():
        with pytest.raises(TlsError) as info:
            server_context(c, k)
        assert message in str(info.value)
    ctx = server_context(cert, key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
