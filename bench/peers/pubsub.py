"""What the pub/sub peers (nats-server, redis-server) share."""

from __future__ import annotations

from bench.targets import STAMP_SIZE, Target, Wire, peer_binary

SETUP_TIMEOUT = 30.0
"""Seconds a connect may take; generous for thousands of links opened at once."""

CRLF = b"\r\n"


class PubSubPeer(Target):
    """A pub/sub server from the system's packages (``bench/peers/install.sh``)."""

    binary: str
    """The server's executable, also its Debian package."""

    def executable(self) -> str:
        """Path of ``binary``, or an error saying how to install it."""
        path = peer_binary(self.binary)
        if path is None:
            raise RuntimeError(f"{self.binary} not found: run bash bench/peers/install.sh")
        return path


def payload_body(payload: int) -> bytes:
    """A ``payload``-byte body: the stamp is its last ``STAMP_SIZE`` bytes."""
    if payload < STAMP_SIZE:
        raise ValueError(f"payload must hold the {STAMP_SIZE}-byte stamp")
    return bytes(payload)


def crlf_wire(publish: bytes, delivery_size: int, *, reply_per_publish: int,
              batch_trailer: bytes = b"", trailer_reply: int = 0) -> Wire:
    """The layout of frames that end with the payload and then CRLF (NATS, RESP)."""
    end = STAMP_SIZE + len(CRLF)
    return Wire(publish, len(publish) - end, delivery_size, delivery_size - end,
                reply_per_publish, batch_trailer, trailer_reply)
