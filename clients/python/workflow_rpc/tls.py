"""TLS for our servers and channels (docs/security.md#tls-and-mtls): a server's certificate and
key, and the CA its clients' certificates must come from (mutual TLS), all read again when a
file changes, without a restart; a channel's CA, and its own certificate for mTLS."""

from __future__ import annotations

from pathlib import Path

import grpc

from workflow_rpc.reloading import ReloadedFiles

__all__ = ["channel_credentials", "peer_names", "server_credentials"]

# How often a handshake may look at the files for a change, at most.
RELOAD_CHECK_SECONDS = 1.0


def _read(path: Path | str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _server_configuration(files: list[bytes]) -> grpc.ServerCertificateConfiguration:
    """The certificate, key and client CA files' bytes as gRPC takes them, once they hold a
    certificate chain, its own key and the CA's certificates (gRPC checks none of it here: a
    half-written file would be taken and then fail every handshake); ValueError if they do
    not."""
    # Servers only (the serving extra): a client's TLS needs no cryptography.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert, key, *rest = files
    client_ca = rest[0] if rest else None
    chain = x509.load_pem_x509_certificates(cert)
    private = serialization.load_pem_private_key(key, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(
        serialization.Encoding.PEM, spki
    ) != private.public_key().public_bytes(serialization.Encoding.PEM, spki):
        raise ValueError("the key is not the certificate's")
    if client_ca is not None:
        x509.load_pem_x509_certificates(client_ca)
    return grpc.ssl_server_certificate_configuration([(key, cert)], client_ca)


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """A server's TLS; with `client_ca`, every client must show a certificate it signed."""
    paths = [cert, key, *([client_ca] if client_ca is not None else [])]
    files = ReloadedFiles(paths, _server_configuration, "TLS files", RELOAD_CHECK_SECONDS)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        """Asked by gRPC before handshakes: a new configuration if a file changed (None:
        keep the one it has)."""
        return files.value if files.reload() else None

    return grpc.dynamic_ssl_server_credentials(
        files.value, fetch, require_client_authentication=client_ca is not None
    )


def channel_credentials(
    ca: Path | str | None = None, cert: Path | str | None = None, key: Path | str | None = None
) -> grpc.ChannelCredentials:
    """A channel's TLS: the server's CA (None: the system's roots), and for mTLS this side's
    certificate and key."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
    )


def peer_names(auth_context: dict[str, list[bytes]]) -> list[str]:
    """The subject alternative names of the client certificate a call came with (none
    without mTLS)."""
    return [
        name.decode("utf-8", "replace")
        for name in auth_context.get("x509_subject_alternative_name", [])
    ]
