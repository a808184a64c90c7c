"""Key files: the store's encryption keys and the export signing keys.

One key a line, ``KID KEY``: KID is 1-32 of ``A-Z a-z 0-9 _ . -``, KEY the
base64 of 32 random bytes (``fenghuo keygen`` prints such a line); ``#``
starts a comment.  The **first** key is the current one (it encrypts, it
signs); every key listed still decrypts and verifies what was made with it,
so rotating is: put a new line first, keep the old ones as long as data or
exports made with them must stay readable.  The format is the token secret
file's (``fenghuo.tokens.keyring``), with the key id required.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from fenghuo.tokens import TokenError, keyring

KEY_BYTES = 32
_KID = re.compile(r"[A-Za-z0-9_.-]{1,32}")


@dataclass(frozen=True, slots=True)
class KeyRing:
    current: str                  # the id of the key that encrypts or signs
    keys: dict[str, bytes]        # every listed key by id

    def key(self, kid: str) -> bytes:
        try:
            return self.keys[kid]
        except KeyError:
            raise ValueError(f"key {kid!r} is not in the key file (was it removed after a "
                             "rotation while data made with it remained?)") from None


def parse(text: str, source: str) -> KeyRing:
    """The keys of a key file's ``text``; ValueError naming ``source`` and the line."""
    try:
        listed = keyring(text)
    except TokenError:
        raise ValueError(f"{source}: no key in the file") from None
    keys: dict[str, bytes] = {}
    for entry in listed:
        if entry.kid is None or not _KID.fullmatch(entry.kid):
            raise ValueError(f"{source}: each line must be 'KID KEY' (KID: 1-32 of A-Z a-z 0-9 _ . -)")
        try:
            value = base64.b64decode(entry.secret, validate=True)
        except binascii.Error:
            raise ValueError(f"{source}: key {entry.kid!r} is not base64") from None
        if len(value) != KEY_BYTES:
            raise ValueError(f"{source}: key {entry.kid!r} must be {KEY_BYTES} bytes, "
                             f"not {len(value)}")
        if entry.kid in keys:
            raise ValueError(f"{source}: key id {entry.kid!r} is listed twice")
        keys[entry.kid] = value
    return KeyRing(listed[0].kid or "", keys)


def load(path: str | os.PathLike[str]) -> KeyRing:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the key file: {exc}") from None
    return parse(text, str(path))


def new_line(kid: str | None = None) -> str:
    """A fresh key file line (``fenghuo keygen``)."""
    kid = kid or f"k{secrets.token_hex(4)}"
    if not _KID.fullmatch(kid):
        raise ValueError("a key id is 1-32 of A-Z a-z 0-9 _ . -")
    return f"{kid} {base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"


def load_or_create(path: str | os.PathLike[str]) -> KeyRing:
    """The key file at ``path``, made (mode 0600, one new key) if there is none."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:       # made meanwhile by another process: read theirs
            return load(path)
        with os.fdopen(fd, "w") as f:
            f.write(new_line() + "\n")
    return load(path)
