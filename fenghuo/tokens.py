"""Signed access tokens: HS256 JWTs, issued by ``fenghuo token`` (PyJWT) and verified here.

Claims (docs/PROTOCOL.md, "Tokens"):

``sub``    user id
``exp``    expiry (seconds since the epoch); ``iat`` issue time
``chan``   channel patterns the user may subscribe to and publish on
``read``   channel patterns the user may only subscribe to
``roles``  roles; ``admin`` may subscribe and publish anywhere (backends);
           ``service`` makes a service user (a bot): it acts only in the
           conversations (groups) it is assigned to, where it may also hand
           the conversation off or queue it for an advisor (PROTOCOL §5.6a);
           ``advisor`` may take the next conversation waiting for an advisor;
           ``api`` marks the server API's own sessions (server/api.py)
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
from dataclasses import dataclass, field, fields
from typing import Any

import jwt
import orjson

from fenghuo.channels import is_pattern, is_user_id, pattern_matches
from fenghuo.core import HS256Key, b64url_decode

ALGORITHM = "HS256"
DEFAULT_TTL = 24 * 3600
#: seconds a token's ``exp`` may be past and still verify (clock skew)
LEEWAY = 5.0
ADMIN = "admin"
#: a service user (a bot), confined to the groups it belongs to (PROTOCOL §5.6a)
SERVICE = "service"
#: may take conversations waiting for an advisor (GROUP op ``take``)
ADVISOR = "advisor"
#: the role of the server API's own sessions (server/api.py), which no client token gets
API_ROLE = "api"


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

    @property
    def is_advisor(self) -> bool:
        return ADVISOR in self.roles or self.is_admin

    @property
    def is_api(self) -> bool:
        return API_ROLE in self.roles

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
    #: the HMAC key: the secret's UTF-8 bytes
    material: bytes = field(init=False, repr=False)
    #: the same key with its HMAC pads hashed once (``keyring`` is cached, so once a secret)
    hs256: HS256Key = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "material", self.secret.encode())
        object.__setattr__(self, "hs256", HS256Key(self.material))


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
    why = _service_conflict(roles, channels, read)
    if why:
        raise ValueError(why)
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "iat": issued, "exp": issued + int(ttl),
              "chan": list(channels), "read": list(read), "roles": list(roles),
              "jti": jti or secrets.token_hex(8)}
    if presence:
        claims["presence"] = True
    key = keyring(secret)[0]
    headers = {"kid": key.kid} if key.kid else None
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers=headers)


def _service_conflict(roles: list[str] | tuple[str, ...], channels: list[str] | tuple[str, ...],
                      read: list[str] | tuple[str, ...]) -> str:
    """Why a token's claims cannot go together ("" if they can): a service user acts only
    in the groups it belongs to, so it has no org patterns and is no admin."""
    if SERVICE in roles and (ADMIN in roles or channels or read):
        return "a service token carries no 'chan' or 'read' patterns and no 'admin' role"
    return ""


# Claims that are times: integers (seconds since the epoch), docs/PROTOCOL.md §5.6.
# PyJWT itself takes "exp": "1796..." (it calls int() on it) and a float.
TIME_CLAIMS = ("exp", "nbf", "iat")


def _check_claim_types(claims: dict[str, Any]) -> None:
    """Refuse claims of the wrong JSON type before PyJWT interprets them."""
    for key in TIME_CLAIMS:
        if key in claims and type(claims[key]) is not int:     # bool is an int subclass
            raise TokenError(f"token claim {key!r} must be an integer")
    if not isinstance(claims.get("sub"), str):
        raise TokenError("token claim 'sub' must be a string")


# Header segments already judged -> their ``kid``: tokens of one issuer share
# one header, so it is parsed once. Bounded: a client sending a new header
# each time only makes the table start over.
_HEADERS: dict[str, str | None] = {}
_HEADERS_MAX = 256


def _segment_json(segment: str, what: str) -> object:
    """A JWS segment's JSON."""
    try:
        return orjson.loads(b64url_decode(segment))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise TokenError(f"token is invalid: its {what} is not base64url JSON") from exc


def _header_kid(segment: str) -> str | None:
    """The ``kid`` of a header that passes (PROTOCOL §5.6, "Header"); TokenError otherwise."""
    if segment in _HEADERS:
        return _HEADERS[segment]
    header = _segment_json(segment, "header")
    if not isinstance(header, dict):
        raise TokenError("token is invalid: its header is not a JSON object")
    if header.get("alg") != ALGORITHM:
        raise TokenError("token is invalid: the algorithm must be HS256")
    if "crit" in header:
        raise TokenError("token is invalid: critical header extensions are not supported")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("token header 'kid' must be a string")
    if len(_HEADERS) >= _HEADERS_MAX:
        _HEADERS.clear()
    _HEADERS[segment] = kid
    return kid


def _claims(secret: str, token: str, leeway: float) -> dict[str, Any]:
    """The verified claims, with the key the header's ``kid`` names, or any key without one.

    HS256 by hand (RFC 7515, 7519): a connect storm verifies thousands of
    tokens a second, and PyJWT's decode (three per token: header, unverified
    types, then verified) was 85 % of a HELLO's time.  The same checks, in
    the order PROTOCOL §5.6 gives them; base64url and the HMAC (each key's
    pads hashed once) in C, core/token.pyx.
    """
    if not isinstance(token, str):
        raise TokenError("token is invalid: not a string")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("token is invalid: a JWT has three dot-separated segments")
    header, payload, signature = parts
    kid = _header_kid(header)
    claims = _segment_json(payload, "payload")
    if not isinstance(claims, dict):
        raise TokenError("token is invalid: its payload is not a JSON object")
    _check_claim_types(claims)
    keys = keyring(secret)
    if kid is not None:
        keys = tuple(k for k in keys if k.kid == kid)
        if not keys:
            raise TokenError(f"token is signed with an unknown key id {kid!r}")
    try:
        sent = b64url_decode(signature)
    except ValueError as exc:
        raise TokenError("token is invalid: its signature is not base64url") from exc
    for key in keys:
        if key.hs256.verify(header, payload, sent):
            break
    else:
        raise TokenError("token is invalid: signature verification failed")
    for claim in ("sub", "exp"):
        if claim not in claims:
            raise TokenError(f"token is invalid: the {claim!r} claim is missing")
    now = time.time()
    if claims["exp"] <= now - leeway:
        raise TokenError("token has expired", expired=True)
    for claim in ("nbf", "iat"):
        if claim in claims and claims[claim] > now + leeway:
            raise TokenError(f"token is invalid: not yet valid ({claim} is in the future)")
    if claims.get("aud"):
        raise TokenError("token is invalid: it names an audience, and the relay is none")
    return claims


def _strings(claims: dict[str, Any], key: str) -> tuple[str, ...]:
    """A claim that is a list of strings (absent or false: none)."""
    value = claims.get(key)
    if not value:
        return ()
    if type(value) is not list or not all(type(v) is str for v in value):
        raise TokenError(f"token claim {key!r} must be a list of strings")
    return tuple(value)


def verify_token(secret: str, token: str, *, leeway: float = LEEWAY) -> Grants:
    """The grants of a valid token; :class:`TokenError` otherwise."""
    claims = _claims(secret, token, leeway)
    user = claims["sub"]
    if not is_user_id(user):
        raise TokenError("token subject is not a valid user id")
    # Most tokens carry few of these: an absent or empty one costs no call.
    roles = _strings(claims, "roles") if claims.get("roles") else ()
    channels = _strings(claims, "chan") if claims.get("chan") else ()
    read = _strings(claims, "read") if claims.get("read") else ()
    why = _service_conflict(roles, channels, read)
    if why:
        raise TokenError(f"token is invalid: {why}")
    jti, issued, presence = claims.get("jti", ""), claims.get("iat", 0), claims.get("presence", False)
    if not isinstance(jti, str) or not isinstance(presence, bool) or isinstance(issued, bool) \
            or not isinstance(issued, (int, float)):
        raise TokenError("token claims jti (string), iat (number), presence (boolean) have wrong types")
    return _verified_grants(user, channels, read, roles, float(claims["exp"]), jti, float(issued),
                            presence)


# Grants of a verified token, made without the frozen dataclass's __init__, which
# sets each of its eight fields through object.__setattr__: here the fields' slot
# descriptors set them (about 2.5 times as fast, timeit; every HELLO makes one).
# The instance is as frozen afterwards, and equal to one Grants(...) makes.
_GRANTS_FIELDS = ("user", "channels", "read", "roles", "expires", "jti", "issued", "sees_all_presence")
assert tuple(f.name for f in fields(Grants)) == _GRANTS_FIELDS, "update _verified_grants"
_set_user, _set_channels, _set_read, _set_roles, _set_expires, _set_jti, _set_issued, _set_presence = (
    getattr(Grants, name).__set__ for name in _GRANTS_FIELDS)


def _verified_grants(user: str, channels: tuple[str, ...], read: tuple[str, ...],
                     roles: tuple[str, ...], expires: float, jti: str, issued: float,
                     presence: bool) -> Grants:
    grants: Grants = object.__new__(Grants)
    _set_user(grants, user)
    _set_channels(grants, channels)
    _set_read(grants, read)
    _set_roles(grants, roles)
    _set_expires(grants, expires)
    _set_jti(grants, jti)
    _set_issued(grants, issued)
    _set_presence(grants, presence)
    return grants


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
