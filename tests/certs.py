"""A certificate authority made for one test run, and the certificates it signs: for servers on loopback (the
storage proxy, the local control plane and its webhooks) and for the clients that prove who they are to them."""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common: str, organization: str = "") -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if organization:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def private_key_pem(key: Any) -> bytes:
    """A private key in PEM (PKCS#8), as Go's and Python's TLS libraries read it."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Authority:
    """A CA whose certificate is `folder`/ca.crt; it issues certificates into the same folder."""

    def __init__(self, folder: str, name: str = "mnist-trainer test CA") -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().serial_number(x509.random_serial_number()).subject_name(self.name)
            .issuer_name(self.name).public_key(self._key.public_key())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256()))
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.path = _write(os.path.join(folder, "ca.crt"), self.pem)

    def issue(self, name: str, hosts: tuple[str, ...] = (), organization: str = "") -> tuple[str, str]:
        """A certificate for a server answering at `hosts` (DNS names or IPs), or, without hosts, for a client
        called `name` in group `organization`: the paths of `name`.crt and `name`.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if hosts else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (x509.CertificateBuilder().serial_number(x509.random_serial_number())
                   .subject_name(_name(name, organization)).issuer_name(self.name).public_key(key.public_key())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                                  critical=False))
        if hosts:
            names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return (_write(os.path.join(self.folder, f"{name}.crt"), certificate.public_bytes(serialization.Encoding.PEM)),
                _write(os.path.join(self.folder, f"{name}.key"), private_key_pem(key)))
