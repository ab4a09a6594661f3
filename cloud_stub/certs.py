"""A throwaway PKI for demos and tests: a CA, a server certificate, device client certificates.

Everything is made with ``cryptography`` (EC P-256, widely supported by TLS stacks and
Mosquitto). Private keys are written 0600. Not for production fleets: they bring their own CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of the files ``make_pki`` wrote."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    devices: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # id -> (cert, key)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-agent demo fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    hosts: Sequence[str] = (),
    client: bool = False,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_pki(
    directory: Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    devices: Sequence[str] = (),
    *,
    server_valid_days: int = 30,
    server_expired: bool = False,
) -> Pki:
    """Write ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` and ``<device>.pem/.key``.

    ``server_expired`` makes a server certificate whose validity ended yesterday (for tests).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("edge-agent demo CA"))
        .issuer_name(_name("edge-agent demo CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        directory=directory,
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )
    _write_cert(pki.ca_cert, ca_cert)
    _write_key(pki.ca_key, ca_key)
    if server_expired:
        window = (now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    else:
        window = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=server_valid_days))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        hosts[0] if hosts else "server",
        server_key,
        ca_cert,
        ca_key,
        hosts=hosts,
        not_before=window[0],
        not_after=window[1],
    )
    _write_cert(pki.server_cert, server_cert)
    _write_key(pki.server_key, server_key)
    for device in devices:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            device,
            key,
            ca_cert,
            ca_key,
            client=True,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(days=365),
        )
        cert_path, key_path = directory / f"{device}.pem", directory / f"{device}.key"
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
        pki.devices[device] = (cert_path, key_path)
    return pki
