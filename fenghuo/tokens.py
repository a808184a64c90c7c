"""Signed access tokens: HS256 JWTs (PyJWT), issued by ``fenghuo token``.

Claims (docs/PROTOCOL.md, "Tokens"):

``sub``    user id
``exp``    expiry (seconds since the epoch); ``iat`` issue time
``chan``   channel patterns the user may subscribe to and publish on
``read``   channel patterns the user may only subscribe to
``roles``  roles; ``admin`` may subscribe and publish anywhere (backends, bots);
           ``service`` marks the server API's own sessions (server/api.py)
``jti``    token id, the handle of revocation
``presence`` true: may see every user's presence, not only of users sharing a channel

A secret may be a key ring: one key per line, ``KID SECRET`` or a bare
``SECRET`` (no key id), ``#`` comments and blank lines ignored.  The first key
signs (with ``kid`` in the header when it has one); a token carrying a ``kid``
is verified with that key only, one without with each key in turn, so two
secrets are valid at once while tokens move from the old to the new one.

Direct and group channels need no pattern: participants and members may use them.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from pathlib import Path
from dataclasses import dataclass

import jwt

from fenghuo.channels import is_pattern, is_user_id, pattern_matches

ALGORITHM = "HS256"
DEFAULT_TTL = 24 * 3600
#: seconds a token's ``exp`` may be past and still verify (clock skew)
LEEWAY = 5.0
ADMIN = "admin"
#: the role of the server API's own sessions (server/api.py), which no client token gets
SERVICE = "service"


class TokenError(ValueError):
    """Raised for a token that does not verify; ``expired`` tells the two cases apart."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Grants:
    """What a verified token allows."""

    user: str
    channels: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    expires: float = 0.0
    #: the ``jti`` claim ("" when absent) and ``iat`` (0 when absent)
    jti: str = ""
    issued: float = 0.0
    #: the ``presence`` claim: may see every user's presence
    sees_all_presence: bool = False

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    @property
    def is_service(self) -> bool:
        return SERVICE in self.roles

    def can_publish(self, channel: str) -> bool:
        return self.is_admin or any(pattern_matches(p, channel) for p in self.channels)

    def can_subscribe(self, channel: str) -> bool:
        return self.can_publish(channel) or any(pattern_matches(p, channel) for p in self.read)

    def auto_subscriptions(self) -> tuple[str, ...]:
        """Concrete (wildcard-free) channels of the token: subscribed at HELLO."""
        return tuple(p for p in (*self.channels, *self.read) if not is_pattern(p))


@dataclass(frozen=True, slots=True)
class Key:
    kid: str | None
    secret: str


@functools.lru_cache(maxsize=8)
def keyring(secret: str) -> tuple[Key, ...]:
    """The keys of ``secret`` (see the module docstring); the first one signs."""
    keys = []
    for line in secret.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kid, _, value = line.partition(" ")
        keys.append(Key(kid, value.strip()) if value.strip() else Key(None, kid))
    if not keys:
        raise TokenError("the secret is empty")
    return tuple(keys)


def issue_token(
    secret: str,
    user: str,
    *,
    ttl: float = DEFAULT_TTL,
    channels: list[str] | tuple[str, ...] = (),
    read: list[str] | tuple[str, ...] = (),
    roles: list[str] | tuple[str, ...] = (),
    now: float | None = None,
    presence: bool = False,
    jti: str | None = None,
) -> str:
    """A signed token for ``user`` valid for ``ttl`` seconds, with a random ``jti``."""
    if not is_user_id(user):
        raise ValueError(f"invalid user id {user!r}: 1-64 of A-Z a-z 0-9 _ . @ + -")
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "iat": issued, "exp": issued + int(ttl),
              "chan": list(channels), "read": list(read), "roles": list(roles),
              "jti": jti or secrets.token_hex(8)}
    if presence:
        claims["presence"] = True
    key = keyring(secret)[0]
    headers = {"kid": key.kid} if key.kid else None
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers=headers)


# Claims that are times: integers (seconds since the epoch), docs/PROTOCOL.md §5.6.
# PyJWT itself takes "exp": "1796..." (it calls int() on it) and a float.
TIME_CLAIMS = ("exp", "nbf", "iat")


def _check_claim_types(claims: dict) -> None:
    """Refuse claims of the wrong JSON type before PyJWT interprets them."""
    for key in TIME_CLAIMS:
        if key in claims and type(claims[key]) is not int:     # bool is an int subclass
            raise TokenError(f"token claim {key!r} must be an integer")
    if not isinstance(claims.get("sub"), str):
        raise TokenError("token claim 'sub' must be a string")


def _decode(key: str, token: str, leeway: float) -> dict:
    try:
        return jwt.decode(token, key, algorithms=[ALGORITHM], leeway=leeway,
                          options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError as exc:
        raise TokenError("token has expired", expired=True) from exc
    except jwt.PyJWTError as exc:
        raise TokenError(f"token is invalid: {exc}") from exc


def _claims(secret: str, token: str, leeway: float) -> dict:
    """The verified claims, with the key the header's ``kid`` names, or any key without one."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        # Types first, from the payload as sent: PyJWT would judge a string
        # or boolean `exp` by its own coercions.
        _check_claim_types(jwt.decode(token, options={"verify_signature": False}))
    except jwt.PyJWTError as exc:
        raise TokenError(f"token is invalid: {exc}") from exc
    keys = keyring(secret)
    if kid is not None:
        if not isinstance(kid, str):
            raise TokenError("token header 'kid' must be a string")
        keys = tuple(k for k in keys if k.kid == kid)
        if not keys:
            raise TokenError(f"token is signed with an unknown key id {kid!r}")
    for key in keys[:-1]:
        try:
            return _decode(key.secret, token, leeway)
        except TokenError as exc:
            if exc.expired:
                raise
    return _decode(keys[-1].secret, token, leeway)


def verify_token(secret: str, token: str, *, leeway: float = LEEWAY) -> Grants:
    """The grants of a valid token; :class:`TokenError` otherwise."""
    claims = _claims(secret, token, leeway)
    user = claims["sub"]
    if not is_user_id(user):
        raise TokenError("token subject is not a valid user id")

    def strings(key: str) -> tuple[str, ...]:
        value = claims.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TokenError(f"token claim {key!r} must be a list of strings")
        return tuple(value)

    jti, issued, presence = claims.get("jti", ""), claims.get("iat", 0), claims.get("presence", False)
    if not isinstance(jti, str) or not isinstance(presence, bool) or isinstance(issued, bool) \
            or not isinstance(issued, (int, float)):
        raise TokenError("token claims jti (string), iat (number), presence (boolean) have wrong types")
    return Grants(user=user, channels=strings("chan"), read=strings("read"),
                  roles=strings("roles"), expires=float(claims["exp"]), jti=jti,
                  issued=float(issued), sees_all_presence=presence)


DEV_SECRET_FILE = "dev-secret"


def resolve_secret(secret: str | None, data_dir: str | os.PathLike[str], *,
                   create: bool = False, secret_file: str | None = None) -> tuple[str, bool]:
    """The signing secret: ``secret``, else ``secret_file``'s text, else the dev secret under ``data_dir``.

    With ``create``, a missing dev secret is generated and stored (mode 0600)
    so tokens survive restarts; returns ``(secret, generated)``.
    """
    if secret:
        return secret, False
    if secret_file:
        try:
            text = Path(secret_file).read_text()
        except OSError as exc:
            raise TokenError(f"cannot read the secret file: {exc}") from None
        keyring(text)     # refuses an empty file here, not at the first HELLO
        return text, False
    path = Path(data_dir) / DEV_SECRET_FILE
    if path.exists():
        return path.read_text().strip(), False
    if not create:
        raise TokenError(f"no secret: pass --secret, set FENGHUO_SECRET, or start the "
                         f"server once with --data-dir {data_dir} to generate {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True
