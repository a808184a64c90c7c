"""A throwaway certificate authority for TLS tests, made with the ``openssl`` binary."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class CA:
    """A CA in ``folder``: ``ca.pem`` (certificate) and ``ca.key``."""

    folder: Path
    name: str

    @property
    def cert(self) -> Path:
        return self.folder / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.folder / f"{self.name}.key"

    @classmethod
    def create(cls, folder: Path, name: str = "ca") -> CA:
        ca = cls(folder, name)
        folder.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(ca.key), "-out", str(ca.cert), "-days", "2",
                 "-subj", f"/CN=fenghuo test {name}")
        return ca

    def issue(self, name: str, *, server: bool = True) -> tuple[Path, Path]:
        """``(cert, key)`` signed by this CA: for localhost/127.0.0.1, or a client's."""
        key, csr, cert = (self.folder / f"{name}{ext}" for ext in (".key", ".csr", ".pem"))
        ext = self.folder / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                       if server else "extendedKeyUsage=clientAuth\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
        return cert, key
