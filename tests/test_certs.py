"""Federation CA, SuperLink certificate and SuperNode authentication keys."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcrm.privacy.certs import (
    generate_ca,
    generate_node_auth_key,
    issue_server_cert,
    load_node_private_key,
    load_node_public_key,
)
from fedcrm.privacy.errors import KeyFileError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_carries_loopback_sans_and_is_signed_by_the_ca(tmp_path: Path) -> None:
    ca = generate_ca(tmp_path / "ca", common_name="test CA")
    hosts = ("127.0.0.1", "localhost", "link.example")
    server = issue_server_cert(ca, tmp_path / "server", hosts=hosts)
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example"]
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    """A complete in-memory TLS handshake (no sockets); raises what a real client would."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not complete")


def test_a_tls_client_trusting_the_ca_accepts_the_server_on_127_0_0_1_only(tmp_path: Path) -> None:
    ca = generate_ca(tmp_path, common_name="test CA")
    server = issue_server_cert(ca, tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)
    client_ctx = ssl.create_default_context(cafile=str(ca.cert))
    _handshake(server_ctx, client_ctx, "127.0.0.1")
    _handshake(server_ctx, client_ctx, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, client_ctx, "10.9.8.7")
    other_ca = generate_ca(tmp_path / "other", common_name="other CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, ssl.create_default_context(cafile=str(other_ca.cert)), "127.0.0.1")


def test_private_files_are_0600_and_public_files_are_not_secret(tmp_path: Path) -> None:
    ca = generate_ca(tmp_path / "certs", common_name="test CA")
    server = issue_server_cert(ca, tmp_path / "certs")
    node = generate_node_auth_key(tmp_path / "keys", firm="acme")
    for secret in (ca.key, server.key, node.private_key):
        assert _mode(secret) == 0o600, secret
    for public in (ca.cert, server.cert, node.public_key):
        assert _mode(public) & 0o077 != 0o077 and _mode(public) & 0o400, public
    assert _mode(tmp_path / "keys") == 0o700


def test_node_key_is_openssh_nist_ec_as_flower_requires(tmp_path: Path) -> None:
    node = generate_node_auth_key(tmp_path, firm="acme")
    raw = node.private_key.read_bytes()
    assert raw.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(raw, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    public_text = node.public_key.read_text()
    assert public_text.startswith("ecdsa-sha2-nistp384 ")
    public = serialization.load_ssh_public_key(node.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    loaded = load_node_private_key(node.private_key)
    assert loaded.public_key().public_numbers() == public.public_numbers()
    assert load_node_public_key(node.public_key).public_numbers() == public.public_numbers()


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    ca = generate_ca(tmp_path, common_name="test CA")
    before = ca.key.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_ca(tmp_path, common_name="test CA")
    assert ca.key.read_bytes() == before
    issue_server_cert(ca, tmp_path)
    with pytest.raises(KeyFileError, match="already exists"):
        issue_server_cert(ca, tmp_path)
    node = generate_node_auth_key(tmp_path, firm="acme")
    node_before = node.private_key.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_node_auth_key(tmp_path, firm="acme")
    assert node.private_key.read_bytes() == node_before
    replaced = generate_node_auth_key(tmp_path, firm="acme", force=True)
    assert replaced.private_key.read_bytes() != node_before
    assert _mode(replaced.private_key) == 0o600


def test_unsafe_or_wrong_key_files_are_refused(tmp_path: Path) -> None:
    node = generate_node_auth_key(tmp_path, firm="acme")
    node.private_key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_node_private_key(node.private_key)
    pkcs8 = tmp_path / "pkcs8.key"
    pkcs8.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pkcs8.chmod(0o600)
    with pytest.raises(KeyFileError, match="OpenSSH"):
        load_node_private_key(pkcs8)
    with pytest.raises(KeyFileError, match="letters, digits"):
        generate_node_auth_key(tmp_path, firm="../evil")


def test_error_messages_never_contain_key_material(tmp_path: Path) -> None:
    node = generate_node_auth_key(tmp_path, firm="acme")
    node.private_key.chmod(0o640)
    with pytest.raises(KeyFileError) as info:
        load_node_private_key(node.private_key)
    body = node.private_key.read_text().splitlines()[1]
    assert body not in str(info.value)
