"""TLS for our servers and channels (docs/security.md#tls-and-mtls): a server's certificate and
key, and the CA its clients' certificates must come from (mutual TLS), all read again when a
file changes, without a restart; a channel's CA, and its own certificate for mTLS."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import grpc

__all__ = ["channel_credentials", "peer_names", "server_credentials"]

log = logging.getLogger("workflow_rpc.tls")

# How often a handshake may look at the files for a change, at most.
RELOAD_CHECK_SECONDS = 1.0


def _read(path: Path | str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class _ServerFiles:
    """The certificate, key and client CA files, and the gRPC configuration they make: asked
    by gRPC before handshakes (from its own threads), made again when a file changed."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.paths = [p for p in (cert, key, client_ca) if p is not None]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._checked = time.monotonic()
        self.initial = self._configuration()

    def _stamps(self) -> list[tuple[int, int]]:
        return [((st := os.stat(p)).st_mtime_ns, st.st_size) for p in self.paths]

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC takes them, once they hold a certificate chain, its own key and
        the CA's certificates (gRPC checks none of it here: a half-written file would be taken
        and then fail every handshake); ValueError if they do not."""
        # Servers only (the serving extra): a client's TLS needs no cryptography.
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        client_ca = _read(self.client_ca)
        chain = x509.load_pem_x509_certificates(cert)
        private = serialization.load_pem_private_key(key, password=None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if chain[0].public_key().public_bytes(
            serialization.Encoding.PEM, spki
        ) != private.public_key().public_bytes(serialization.Encoding.PEM, spki):
            raise ValueError(f"{self.key} is not the key of {self.cert}")
        if client_ca is not None:
            x509.load_pem_x509_certificates(client_ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if a file changed since the last one (None: keep it)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < RELOAD_CHECK_SECONDS:
                return None
            self._checked = now
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return None
                configuration = self._configuration()
            except (OSError, ValueError) as exc:
                log.error(
                    "TLS files not reloaded: the last good ones stay in force",
                    extra={"error": str(exc)},
                )
                return None
            self._stamp = stamp
            log.info("TLS files reloaded", extra={"cert": str(self.cert)})
            return configuration


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """A server's TLS; with `client_ca`, every client must show a certificate it signed."""
    files = _ServerFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=client_ca is not None
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
