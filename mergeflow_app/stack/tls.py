"""Mutual TLS for an authenticated stack's SeaweedFS.

`up --auth` generates, once, a private CA and one certificate (127.0.0.1, localhost; serverAuth and clientAuth)
that every SeaweedFS component presents, as a server and as a client; the CA's key is thrown away at once, so no
other certificate can ever be made that the cluster accepts. `STATE/security.toml` (read by `weed server` from its
working directory, the state directory) requires that certificate on every gRPC port (master, volume, filer, S3;
an authenticated stack runs no admin server) and on the master's, volume server's and filer's HTTP ports (HTTPS
with client certificates), and makes SeaweedFS's own clients present it. Only the S3 gateway's port stays plain
HTTP: it checks every request's signature. The file holds paths only: the JWT keys still come from the
environment (`auth`).
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

from mergeflow_app.stack.config import HOST, StackConfig, StackError, write_private

SECURITY_FILE = "security.toml"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "seaweedfs.crt", "seaweedfs.key"
GRPC_SERVERS = ("master", "volume", "filer", "s3")  # [grpc.<x>]: mTLS on its port, and its dials
HTTPS_SERVERS = ("master", "volume", "filer")  # [https.<x>]: HTTPS requiring a client certificate
GRPC_PORTS = ("seaweed_master_grpc_port", "seaweed_volume_grpc_port", "seaweed_filer_grpc_port", "s3_grpc_port")
HTTPS_PORTS = ("seaweed_master_port", "seaweed_volume_port", "seaweed_filer_port")
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def tls_dir(state_dir: Path) -> Path:
    return state_dir / "auth" / "tls"


def security_path(config: StackConfig) -> Path:
    return config.state_dir / SECURITY_FILE


def client_files(state_dir: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, certificate, key): what a client presents to reach SeaweedFS's own ports."""
    directory = tls_dir(state_dir)
    return directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE


def ensure_certificates(directory: Path, hosts: tuple[str, ...] = (HOST, "localhost")) -> None:
    """Generate the CA's certificate and the cluster's certificate and key for `hosts` into `directory` (mode
    0600) unless all three files exist there."""
    ca_path, cert_path, key_path = (directory / name for name in (CA_FILE, CERT_FILE, KEY_FILE))
    if ca_path.exists() and cert_path.exists() and key_path.exists():
        return
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=3650)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mergeflow stack CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mergeflow-seaweedfs")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = serialization.Encoding.PEM
    write_private(key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode())
    write_private(cert_path, cert.public_bytes(pem).decode())
    write_private(ca_path, ca_cert.public_bytes(pem).decode())  # written last: its presence means "all done"


def security_toml(ca: str, cert: str, key: str) -> str:
    """SeaweedFS's security.toml requiring the certificate everywhere but the S3 gateway (paths only)."""
    lines = ["# written by `mergeflow stack up --auth`: mutual TLS on SeaweedFS's gRPC ports and its master's, volume",
             "# server's and filer's HTTP ports; paths only (the JWT keys come from the environment)",
             "[grpc]", f'ca = "{ca}"']
    for component in (*GRPC_SERVERS, "client"):
        lines += ["", f"[grpc.{component}]", f'cert = "{cert}"', f'key = "{key}"']
    for component in HTTPS_SERVERS:
        lines += ["", f"[https.{component}]", f'cert = "{cert}"', f'key = "{key}"', f'ca = "{ca}"']
    lines += ["", "[https.client]", "enabled = true", f'cert = "{cert}"', f'key = "{key}"', f'ca = "{ca}"', ""]
    return "\n".join(lines)


def write_security_file(config: StackConfig) -> None:
    """The certificates (once) and `STATE/security.toml` (0600)."""
    ensure_certificates(tls_dir(config.state_dir))
    write_private(security_path(config), security_toml(*(str(p) for p in client_files(config.state_dir))))


def answers_plaintext(port: int, grpc: bool, host: str = HOST, timeout: float = 5.0) -> bool:
    """Whether a port serves a client that speaks no TLS: a gRPC port answers an HTTP/2 preface with a SETTINGS
    frame, an HTTP port a GET with a response (a TLS port's answer is Go's "HTTP request to an HTTPS server")."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_H2_PREFACE if grpc else f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            head = sock.recv(256)
    except OSError:
        return False
    if grpc:
        return len(head) >= 4 and head[3] == 0x04
    return head.startswith(b"HTTP/") and b"HTTPS server" not in head


def verify_closed(config: StackConfig) -> None:
    """Fail closed: SeaweedFS serves plaintext when it cannot load a certificate, so `up` checks that none of its
    own ports answers a client without one."""
    open_ports = [f"{name}={getattr(config, name)}" for name in (*GRPC_PORTS, *HTTPS_PORTS)
                  if answers_plaintext(getattr(config, name), grpc=name in GRPC_PORTS)]
    if open_ports:
        raise StackError(f"SeaweedFS answers clients without the stack's certificate on {', '.join(open_ports)}: "
                         f"it did not apply {security_path(config)}; see its log {config.log_path('s3')}")


if __name__ == "__main__":  # certificates for docker/compose.auth.yaml: python -m mergeflow_app.stack.tls DIR HOST...
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m mergeflow_app.stack.tls DIR [HOST ...]  (hosts default to 127.0.0.1 localhost)")
    ensure_certificates(Path(sys.argv[1]), tuple(sys.argv[2:]) or (HOST, "localhost"))
    print(f"{sys.argv[1]}: {CA_FILE}, {CERT_FILE}, {KEY_FILE} (mode 0600; an existing set is kept)")
