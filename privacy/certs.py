"""TLS certificates and SuperNode authentication keys for a fedcrm federation.

Three kinds of files, all created here with ``cryptography`` only:

* a **federation CA** (``ca.crt`` public, ``ca.key`` secret): the coordinator keeps the key,
  every firm receives ``ca.crt`` to verify the SuperLink,
* a **SuperLink server certificate** (``server.crt`` / ``server.key``) signed by the CA, with
  the coordinator's addresses as subjectAltNames (TLS clients check the SAN, not the CN),
* a **SuperNode authentication key** per firm (``<firm>.key`` secret, ``<firm>.pub`` public):
  a NIST P-384 EC key, the private half in OpenSSH PEM form (Flower's SuperNode refuses PKCS8)
  and the public half in OpenSSH one-line form (what ``flwr supernode register`` reads).

Private files are written with mode 0600 (their directory 0700) and are never overwritten
unless ``force=True``. Paths are returned as frozen values; nothing here logs key material.
:func:`certificate_fingerprint` is what a firm compares, out of band, before trusting ``ca.crt``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcrm.privacy.durable import ensure_output_dir, write_atomic, write_private
from fedcrm.privacy.errors import KeyFileError
from fedcrm.privacy.keys import check_firm_name

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class CaFiles:
    """The federation CA: ``cert`` is shared with every firm, ``key`` stays with the coordinator."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertFiles:
    """The SuperLink's TLS certificate and key, plus the CA that signed them."""

    ca_cert: Path
    cert: Path
    key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class NodeKeyFiles:
    """A firm's SuperNode authentication key: ``private_key`` is secret, ``public_key`` is not."""

    firm: str
    private_key: Path
    public_key: Path


def _write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o644)


def _prepare_dir(out_dir: Path) -> Path:
    return ensure_output_dir(Path(out_dir), what="output folder", mode=0o700)


def _refuse_existing(paths: tuple[Path, ...], *, force: bool) -> None:
    """Fail before writing anything when a key already exists (no half-replaced pairs)."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise KeyFileError(
                f"{path} already exists; refusing to overwrite a private key (pass force=True / "
                "--force to replace it, which invalidates everything that trusts the old key)"
            )


def _read_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if not path.exists():
        raise KeyFileError(f"key file {path} not found; create it with `fedcrm certs ca`")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path} is not an EC private key; regenerate it with `fedcrm certs ca`")
    return key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate_ca(out_dir: Path, *, common_name: str, force: bool = False) -> CaFiles:
    """Create a self-signed federation CA (EC P-384) as ``ca.crt`` and ``ca.key`` in ``out_dir``."""
    out_dir = _prepare_dir(out_dir)
    files = CaFiles(cert=out_dir / CA_CERT, key=out_dir / CA_KEY)
    _refuse_existing((files.key,), force=force)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(files.key, _pem_private(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _san_entries(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def issue_server_cert(
    ca: CaFiles,
    out_dir: Path,
    *,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    force: bool = False,
) -> ServerCertFiles:
    """Issue the SuperLink's TLS certificate, signed by ``ca``, valid for every name in ``hosts``.

    IP literals become IP subjectAltNames, everything else DNS names. Add the coordinator's
    public DNS name / IP here when the firms connect from other hosts.
    """
    if not hosts:
        raise KeyFileError("issue_server_cert needs at least one host name or IP for the SAN")
    hosts = tuple(hosts)
    out_dir = _prepare_dir(out_dir)
    files = ServerCertFiles(
        ca_cert=Path(ca.cert), cert=out_dir / SERVER_CERT, key=out_dir / SERVER_KEY, hosts=hosts
    )
    _refuse_existing((files.key,), force=force)
    if Path(ca.cert).resolve() != (out_dir / CA_CERT).resolve():
        # the SuperLink's certs directory gets ca.crt, never ca.key (which can then go offline)
        _write_public(out_dir / CA_CERT, Path(ca.cert).read_bytes())
        files = ServerCertFiles(
            ca_cert=out_dir / CA_CERT, cert=files.cert, key=files.key, hosts=hosts
        )
    ca_key = _read_private_key(Path(ca.key))
    try:
        ca_cert = x509.load_pem_x509_certificate(Path(ca.cert).read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{ca.cert} is not a PEM certificate; recreate the CA with `fedcrm certs ca`"
        ) from None
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private(files.key, _pem_private(key))
    _write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError:
        raise KeyFileError(f"certificate {path} not found or unreadable") from None
    except ValueError:
        raise KeyFileError(f"{path} is not a PEM certificate") from None


def certificate_fingerprint(path: Path) -> str:
    """``SHA256:AB:CD:...``: the SHA-256 of the certificate's DER bytes (as ``openssl x509
    -fingerprint -sha256`` prints it), for a firm to compare with the coordinator's by phone."""
    digest = _certificate(path).fingerprint(hashes.SHA256())
    return "SHA256:" + ":".join(f"{b:02X}" for b in digest)


def certificate_hosts(path: Path) -> tuple[str, ...]:
    """The DNS names and IPs a server certificate is valid for (its subjectAltNames)."""
    try:
        sans = _certificate(path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names = [str(n) for n in sans.value.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)]
    return tuple(names)


def generate_node_auth_key(out_dir: Path, *, firm: str, force: bool = False) -> NodeKeyFiles:
    """Create a firm's SuperNode authentication key pair (EC P-384, OpenSSH formats).

    ``<firm>.key`` (0600) is passed only to that firm's ``flower-supernode``; ``<firm>.pub`` is
    sent to the coordinator, who registers it with ``flwr supernode register``.
    """
    check_firm_name(firm)
    out_dir = _prepare_dir(out_dir)
    files = NodeKeyFiles(
        firm=firm, private_key=out_dir / f"{firm}.key", public_key=out_dir / f"{firm}.pub"
    )
    _refuse_existing((files.private_key,), force=force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_private(files.private_key, private)
    _write_public(files.public_key, public + f" fedcrm-{firm}\n".encode())
    return files


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load and check a firm's OpenSSH public key (what the coordinator registers)."""
    path = Path(path)
    if not path.exists():
        raise KeyFileError(
            f"public key {path} not found; the firm creates it with `fedcrm certs node-key`"
        )
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(
            f"{path} is not an OpenSSH public key (expected 'ecdsa-sha2-nistp384 ...')"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError(
            f"{path} is not an EC public key; Flower needs a NIST EC key (P-256/384/521)"
        )
    return key


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load and check a firm's OpenSSH private key the way ``flower-supernode`` will."""
    path = Path(path)
    if not path.exists():
        raise KeyFileError(f"node key {path} not found; create it with `fedcrm certs node-key`")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(
            f"node key {path} is readable by others (mode {mode:04o}); run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except ValueError:
        raise KeyFileError(
            f"{path} is not an unencrypted OpenSSH private key (Flower refuses PKCS8); "
            "recreate it with `fedcrm certs node-key`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(
            f"{path} is not an EC private key; Flower needs a NIST EC key (P-256/384/521)"
        )
    return key
