"""Signing and verifying webhooks as the Standard Webhooks specification says.

A receiver checks every request before trusting it::

    from fenghuo.webhooks import verify, WebhookVerificationError

    try:
        event = verify(["whsec_..."], request.headers, body)   # the parsed JSON payload
    except WebhookVerificationError:
        return 400

The relay signs with the same functions (server/webhooks.py), so what it
sends and what this module accepts are one definition.  Headers:
``webhook-id`` (the event's id, the same on every retry: deduplicate on it),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` once for every secret of
the endpoint, separated by spaces, so that a secret can be rotated without
refusing a request.  A secret is ``whsec_`` and the base64 of its key bytes.

``python -m fenghuo.webhooks secret`` prints a new secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _secrets
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

SECRET_PREFIX = "whsec_"
#: a request whose timestamp is further than this from the receiver's clock is refused (replays)
TOLERANCE_S = 5 * 60
SECRET_BYTES = 32


class WebhookVerificationError(Exception):
    """The request is not a webhook signed with one of the receiver's secrets."""


def new_secret() -> str:
    """A new random secret, ``whsec_`` + base64 of 32 bytes."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of ``whsec_<base64>``; ValueError for anything else."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret needs at least 16 bytes of key")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>``."""
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_header(keys: Iterable[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per key, space separated."""
    return " ".join(sign(key, webhook_id, timestamp, body) for key in keys)


def headers(keys: Iterable[bytes], webhook_id: str, body: bytes,
            timestamp: int | None = None) -> dict[str, str]:
    """The three signing headers of one delivery attempt (the relay's side)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": webhook_id, "webhook-timestamp": str(ts),
            "webhook-signature": signature_header(keys, webhook_id, ts, body)}


def verify(secrets: str | Iterable[str], headers: Mapping[str, str], body: bytes,
           tolerance: float = TOLERANCE_S, now: float | None = None) -> Any:
    """The JSON payload of a request signed with one of ``secrets``, or WebhookVerificationError.

    ``headers`` is looked up in lower case and as sent (aiohttp's, Flask's and
    a plain dict all work); ``body`` is the raw bytes, before any parsing.
    """
    keys = [secret_key(s) for s in ([secrets] if isinstance(secrets, str) else secrets)]
    webhook_id, stamp, signatures = (_header(headers, name) for name in (
        "webhook-id", "webhook-timestamp", "webhook-signature"))
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is too far from now (a replay?)")
    given = [s.split(",", 1)[1] for s in signatures.split() if s.startswith("v1,")]
    for key in keys:
        expected = sign(key, webhook_id, timestamp, body).split(",", 1)[1]
        if any(hmac.compare_digest(expected, g) for g in given):
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                raise WebhookVerificationError("the body is not JSON") from None
    raise WebhookVerificationError("no signature matches the secrets")


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name) or headers.get(name.title())
    if not value:
        raise WebhookVerificationError(f"missing header {name}")
    return value


def main(argv: list[str]) -> int:
    if argv == ["secret"]:
        print(new_secret())
        return 0
    print("usage: python -m fenghuo.webhooks secret   (prints a new whsec_ secret)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
