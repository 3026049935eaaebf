"""Self-signed certificates (ECDSA P-256): a cluster's CA, the dev simulator's and the bench
proxy's server certificates. Random keys: never call inside a workflow."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(
    common_name: str,
    validity: datetime.timedelta,
    *,
    ca: bool = False,
    hosts: Sequence[str] = (),
) -> tuple[str, str]:
    """(certificate PEM, key PEM). `ca` makes it a CA (may sign certificates); `hosts` (names
    or IP addresses) go into the subject alternative names of a server certificate.

    ECDSA because an RSA-2048 key takes ~0.1 s to generate, on a deploy's critical path. The
    key PEM is SEC 1 ('EC PRIVATE KEY'), as kubeadm writes ECDSA keys; Go and Python load it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            _key_usage(signs_certificates=True),
            critical=True,
        )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    key_pem = _key_pem(key)
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def client_certificate(
    ca_cert_pem: str,
    ca_key_pem: str,
    user: str,
    groups: Sequence[str],
    validity: datetime.timedelta,
    now: datetime.datetime | None = None,
) -> tuple[str, str, x509.Certificate]:
    """A client certificate signed by the CA (Kubernetes reads CN as the user and O as the
    groups): (certificate PEM, key PEM, the certificate). Backdated five minutes for clock
    skew, as kubeadm does."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    ca_key = serialization.load_pem_private_key(ca_key_pem.encode(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the cluster CA's key is not an ECDSA key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        + [x509.NameAttribute(NameOID.COMMON_NAME, user)]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(signs_certificates=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = _key_pem(key)
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem, cert


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """Signing only (an ECDSA key enciphers nothing); a CA's signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """SEC 1 PEM ('EC PRIVATE KEY'), as kubeadm writes ECDSA keys."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def key_pair() -> tuple[str, str]:
    """An ECDSA P-256 key pair as PEM: (private key, public key), as kubeadm's sa.key/sa.pub."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _key_pem(key), public.decode()
