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
from dataclasses import dataclass, field

from fenghuo.channels import is_user_id
from fenghuo.core import (
    ADMIN_ROLE,
    ADVISOR_ROLE,
    API_ROLE as API_ROLE,
    SERVICE_ROLE,
    HS256Key,
    service_conflict,
    verify_hs256,
)
# What a verified token allows, and the error of one that does not verify:
# made in C (core/token.pyx), part of this module's API.
from fenghuo.core import Grants as Grants, TokenError as TokenError

ALGORITHM = "HS256"
DEFAULT_TTL = 24 * 3600
#: seconds a token's ``exp`` may be past and still verify (clock skew)
LEEWAY = 5.0
ADMIN = ADMIN_ROLE
#: a service user (a bot), confined to the groups it belongs to (PROTOCOL §5.6a)
SERVICE = SERVICE_ROLE
#: may take conversations waiting for an advisor (GROUP op ``take``)
ADVISOR = ADVISOR_ROLE
#: API_ROLE (imported): the role of the server API's own sessions (server/api.py),
#: which no client token gets


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
        object.__setattr__(self, "hs256", HS256Key(self.material, self.kid))


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
    why = service_conflict(roles, channels, read)
    if why:
        raise ValueError(why)
    issued = int(time.time() if now is None else now)
    claims = {"sub": user, "iat": issued, "exp": issued + int(ttl),
              "chan": list(channels), "read": list(read), "roles": list(roles),
              "jti": jti or secrets.token_hex(8)}
    if presence:
        claims["presence"] = True
    # PyJWT (and the cryptography it loads) only where a token is signed: a
    # relay verifies tokens in the core and never imports it (0.3-0.5 s of a
    # supervisor's or worker's start on the loaded 2-core machine).
    import jwt

    key = keyring(secret)[0]
    headers = {"kid": key.kid} if key.kid else None
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers=headers)


@functools.lru_cache(maxsize=8)
def hs256_keys(secret: str) -> tuple[HS256Key, ...]:
    """``keyring(secret)``'s HMAC keys, each knowing its key id: what
    ``verify_hs256`` takes.  Cached for the last few secrets, so a caller that
    verifies many tokens (the relay's HELLO, core/hello.pyx) makes them once
    per secret, and again when the secret changes (SIGHUP)."""
    return tuple(key.hs256 for key in keyring(secret))


def verify_token(secret: str, token: str, *, leeway: float = LEEWAY) -> Grants:
    """The grants of a valid token; :class:`TokenError` otherwise.

    HS256 by hand (RFC 7515, 7519), in C (core/token.pyx ``verify_hs256``):
    a connect storm verifies thousands of tokens a second, and PyJWT's decode
    (three per token) was 85 % of a HELLO's time.  The checks and their order
    are PROTOCOL §5.6's: the header (``alg`` HS256, no ``crit``, a string
    ``kid``; each distinct header judged once), the payload a JSON object
    whose ``exp``, ``nbf``, ``iat`` are integers and ``sub`` a string, the
    key the ``kid`` names (or each key in turn without one), the signature,
    ``exp`` present and not ``leeway`` seconds past, ``nbf`` and ``iat`` not
    in the future, no ``aud``; then ``sub`` a user id, ``roles``, ``chan``,
    ``read`` lists of strings (absent or false: none), no service conflict,
    ``jti`` a string and ``presence`` a boolean.
    """
    return verify_hs256(token, hs256_keys(secret), leeway)


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
