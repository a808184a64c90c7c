"""TLS on the client port: the server's context, and its reload on SIGHUP.

One :class:`ssl.SSLContext` serves every connection of a worker.  Reloading
loads the new certificate into that same context: OpenSSL copies the
certificate into each connection when it is accepted, so connections accepted
from then on present the new one and open ones keep theirs.
"""

from __future__ import annotations

import logging
import ssl

from fenghuo.server.config import Settings

log = logging.getLogger("fenghuo.tls")


class ServerTLS:
    """The TLS context of ``--tls-cert``/``--tls-key`` (and ``--tls-client-ca``)."""

    def __init__(self, cert: str, key: str = "", client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = cert, key or None, client_ca
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load()

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerTLS | None:
        if not settings.tls_cert:
            return None
        return cls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)

    def _load(self) -> None:
        self.context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            self.context.load_verify_locations(cafile=self.client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED

    def reload(self) -> bool:
        """Read the certificate files again (SIGHUP); on failure keep serving the old ones."""
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate reload failed; keeping the current one",
                      extra={"cert": self.cert, "error": str(exc)})
            return False
        log.info("TLS certificate reloaded", extra={"cert": self.cert})
        return True
