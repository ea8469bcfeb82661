"""TLS certificates and SuperNode keys for a Flower deployment, made with the ``cryptography`` package.

* ``tls``: a certificate authority (``ca.crt``) and a server certificate signed by it
  (``server.pem``, key ``server.key``) for the SuperLink's host names and IP addresses;
  the SuperLink serves TLS with them, SuperNodes and the ``flwr`` CLI trust ``ca.crt``.
* ``node-key``: one SuperNode's authentication key pair, an ECDSA P-384 key in OpenSSH
  format (``NAME`` private, ``NAME.pub`` public) as ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read them.

``fedplora deploy-local`` makes fresh ones for every run; across real machines run this module
(README, "Deployment")::

    python -m fedplora.federation.credentials tls certs --host 192.168.1.10 --host superlink.lan
    python -m fedplora.federation.credentials node-key keys/node-0
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:  # created owner-only, never readable by others even for a moment
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedplora"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_tls(folder: Path, hosts: list[str] | tuple[str, ...] = LOOPBACK_HOSTS, days: int = 365) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts`` (IP addresses and DNS names) in ``folder``.

    Returns the paths: ``ca`` (ca.crt, for SuperNodes and ``flwr``), ``cert`` (server.pem) and ``key``
    (server.key, mode 0600) for the SuperLink. ``ca.key`` is written too (0600): keep it off the
    SuperLink machine if you can; it is only needed to sign more server certificates.
    """
    hosts = list(hosts)
    if not hosts:
        raise ValueError("make_tls: give at least one host name or IP address of the SuperLink")
    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (x509.CertificateBuilder()
               .subject_name(_name("fedplora deployment CA")).issuer_name(_name("fedplora deployment CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(ca_ski, critical=False)
               .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    private = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                   encryption_algorithm=serialization.NoEncryption())
    _write(folder / "ca.key", ca_key.private_bytes(**private), private=True)
    return {"ca": _write(folder / "ca.crt", ca_cert.public_bytes(pem)),
            "cert": _write(folder / "server.pem", cert.public_bytes(pem)),
            "key": _write(folder / "server.key", key.private_bytes(**private), private=True)}


def make_node_key(path: Path) -> tuple[Path, Path]:
    """One SuperNode's key pair: ``path`` (private, OpenSSH, 0600) and ``path.pub`` (public, OpenSSH)."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (_write(path, private, private=True),
            _write(path.with_name(path.name + ".pub"), public + b"\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedplora.federation.credentials", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="a CA and a SuperLink server certificate (ca.crt, server.pem, server.key)")
    tls.add_argument("folder", type=Path, help="where to write the files")
    tls.add_argument("--host", action="append", dest="hosts", metavar="HOST",
                     help="an IP address or DNS name SuperNodes and `flwr` use to reach the SuperLink; "
                          f"repeat for several (default: {', '.join(LOOPBACK_HOSTS)})")
    tls.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    node = sub.add_parser("node-key", help="a SuperNode's authentication key pair (PATH and PATH.pub)")
    node.add_argument("path", type=Path, help="private key file to write; the public key goes to PATH.pub")
    args = parser.parse_args(argv)
    if args.command == "tls":
        paths = make_tls(args.folder, args.hosts or LOOPBACK_HOSTS, days=args.days)
        print(f"CA certificate (give it to every SuperNode and to `flwr`): {paths['ca']}")
        print(f"SuperLink certificate and key: {paths['cert']} {paths['key']}")
    else:
        private, public = make_node_key(args.path)
        print(f"SuperNode private key (stays on the device): {private}")
        print(f"public key (register it: flwr supernode register {public} <connection>): {public}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
