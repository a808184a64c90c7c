"""The server API's own client sessions (``Backends``), opened inside the relay.

The API acts as a user through a client session of this relay that speaks the
protocol like any other (docs/DESIGN.md, "Server API"): a publish is a
PUBLISH frame, forwarded, sequenced and fanned out by the code every client
goes through.  The session's connection is a socket pair made in this
process, one end handed to the relay as an accepted connection (through its
admission, as the client port's are), the other to the client.  It never
goes through the client port, so it speaks the protocol in the clear whatever
that port asks of a client: TLS (``--tls-cert``) or a client certificate
(``--tls-client-ca``) apply to the network, not to the relay talking to itself.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fenghuo.client import Client
from fenghuo.server.devices import SERVICE_DEVICE
from fenghuo.tokens import API_ROLE, issue_token

if TYPE_CHECKING:
    from fenghuo.server.relay import Relay

# Users the API keeps a session for at once; the least recently used is closed beyond it.
MAX_BACKEND_SESSIONS = 256
# A backend session's token lives this long; the session is renewed at half of it.
SESSION_TOKEN_TTL = 24 * 3600


class InProcessClient(Client):
    """A :class:`Client` whose every connection (the first and each reconnect) is a
    socket pair into ``relay``, accepted there as a client connection is."""

    def __init__(self, relay: Relay, **kwargs: Any) -> None:
        # The URL is never dialled; it only says the stream is plaintext.
        super().__init__("tcp://127.0.0.1", **kwargs)
        self.relay = relay

    async def _open(self, protocol: Callable[[], asyncio.Protocol]
                    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        relay = self.relay
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            await loop.connect_accepted_socket(
                relay.admission.protocol_factory(relay.node.new_session), theirs)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        return await loop.create_connection(protocol, sock=ours)


@dataclass
class Backends:
    """One client session per user the API acts as, inside ``relay``."""

    relay: Relay
    secret: str
    sessions: OrderedDict[str, tuple[float, asyncio.Task[Client]]] = field(default_factory=OrderedDict)

    async def as_user(self, user: str) -> Client:
        entry = self.sessions.get(user)
        now = time.monotonic()
        # A session stopped for good (its token revoked: a backend's `revoke` of the
        # user) is replaced by one with a new token, as a client would log in again.
        if entry is not None and (now - entry[0] > SESSION_TOKEN_TTL / 2 or entry[1].done()
                                  and (entry[1].exception() is not None or entry[1].result().stopped)):
            self._drop(user)
            entry = None
        if entry is None:
            token = issue_token(self.secret, user, ttl=SESSION_TOKEN_TTL, roles=["admin", API_ROLE])
            # What the user receives is not kept: no inbox, no cursor sync.
            client = InProcessClient(self.relay, token=token, device=SERVICE_DEVICE,
                                     sync_cursors=False, pending_messages=0)
            entry = self.sessions[user] = (now, asyncio.ensure_future(client.connect()))
            while len(self.sessions) > MAX_BACKEND_SESSIONS:
                self._drop(next(iter(self.sessions)))
        self.sessions.move_to_end(user)
        return await asyncio.shield(entry[1])

    def _drop(self, user: str) -> None:
        _, task = self.sessions.pop(user)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is not None
                               or asyncio.ensure_future(t.result().close()))

    async def close(self) -> None:
        for user in list(self.sessions):
            self._drop(user)
        await asyncio.sleep(0)
