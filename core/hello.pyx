# HELLO (PROTOCOL §3.2) in C, from the frame to WELCOME.  Written in Python
# (server/session.py) it was about a dozen Python calls per connect, some
# 21,000 instructions of a connect + HELLO's 82,000 (python -m bench
# connect-cost); the relay's own objects (users, memberships, presence) are
# still reached through Relay.attach, once.

from cpython.unicode cimport PyUnicode_AsUTF8String

import logging as _logging
from functools import partial as _partial

# The session log (server/session.py's), where "connected" is written.
_session_log = _logging.getLogger("fenghuo.session")

# The device id only the server API's sessions use (server/devices.py SERVICE_DEVICE).
cdef str _SERVICE_DEVICE = "fenghuo-api"


@cython.final
cdef class HelloPath:
    """A relay's HELLO: ``HelloPath(relay, decode, keys_of, new_device, leeway)``, set
    as ``relay.hub.hello``; the core's Connection hands it every HELLO.

    ``decode(body)`` is the HELLO schema's (raising MALFORMED_BODY), ``keys_of(secret)``
    the secret's HS256 keys, ``new_device()`` a device id for a HELLO that names
    none, ``leeway`` the seconds a token may be past its ``exp``.  A cluster node's
    HELLO ends in Python, in the session's ``hello_clustered``.
    """

    def __cinit__(self, relay, decode, keys_of, new_device, double leeway):
        self.relay = relay
        self._decode = decode
        self._keys_of = keys_of
        self._new_device = new_device
        self._leeway = leeway
        self._admission = relay.admission
        self._tokens = relay.tokens
        self._revocations = relay.tokens.revocations
        self._secret = None
        self._keys = ()
        self._template = None
        self._debug = _session_log.isEnabledFor

    cpdef Grants verify(self, object token, str what):
        """The grants of a HELLO's or REFRESH's (``what``) token; fatal errors (REFRESH
        makes them not): TOKEN_INVALID, TOKEN_EXPIRED or TOKEN_REVOKED."""
        cdef Grants grants
        secret = self.relay.secret
        if secret is not self._secret:
            # Read again on SIGHUP (server/main.py): keys_of caches a few secrets.
            self._keys = self._keys_of(secret)
            self._secret = secret
        if not isinstance(token, str):
            raise ProtocolError(ErrorCode.TOKEN_INVALID, f"{what} carries no token")
        try:
            grants = verify_hs256(token, self._keys, self._leeway)
        except TokenError as exc:
            code = ErrorCode.TOKEN_EXPIRED if exc.expired else ErrorCode.TOKEN_INVALID
            raise ProtocolError(code, str(exc)) from None
        if self._revocations is not None and self._revocations.revoked(grants):
            raise ProtocolError(ErrorCode.TOKEN_REVOKED, "token revoked")
        return grants

    cdef int run(self, Connection c, uint32_t request_id, bytes body) except -1:
        relay = self.relay
        if relay.node.shutting_down:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "server is shutting down")
        # Before the body is parsed and the token verified: in a storm,
        # refusing must cost far less than admitting.
        cdef int retry_after_ms = self._admission.admit_hello()
        if retry_after_ms:
            raise self._admission.hello_refusal(retry_after_ms)
        try:
            hello = self._decode(body)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, exc.message, True) from None
        cdef Grants grants = self.verify(hello.token, "HELLO")
        positions = hello.positions
        cdef str device = hello.device or self._new_device()
        if device == _SERVICE_DEVICE and API_ROLE not in grants.roles:
            raise ProtocolError(ErrorCode.FORBIDDEN, f"device id {device!r} is reserved for the server API")
        store = relay.store
        if positions is not None and store is None and hello.epoch != relay.epoch:
            positions = {}   # a memory-only server restarted: old positions mean nothing
        resumed = None
        shared = relay.shared_state
        if positions is None and store is not None and shared is None:
            # A device that kept no state (an app restart): resume where it last synced.
            resumed = store.device_cursors(grants.user, device) or None
            positions = resumed
        c.user = grants.user
        c.user_key = PyUnicode_AsUTF8String(grants.user)
        c.device = device
        c.grants = grants
        c.authenticated = True
        c.hello_at = monotonic()
        self._tokens.watch(c)
        self._admission.handshake_ended()
        c.positions = positions
        cluster = relay.cluster
        # Its next reply and new subscriptions held until they are ready here (subs.hold).
        held = cluster.hold(c) if cluster is not None else None
        relay.attach(c)
        cdef tuple channels = tuple(c.subscriptions)
        if cluster is not None:
            c.hello_clustered(request_id, channels, resumed, held)
        elif c._replies is None and not c._unreleased:
            # Connection.in_turn: nothing awaited (its connection has sent nothing before).
            self.welcome(c, request_id, channels, resumed)
        else:
            c._fill(c._reserve(), _partial(self.welcome, c, request_id, channels, resumed))
        return 0

    cpdef welcome(self, Connection c, uint32_t request_id, tuple channels, object resumed):
        """WELCOME, then what was missed, then live: once ``channels`` are ready here."""
        relay = self.relay
        cdef WelcomeTemplate template = self._template
        if template is None or template.epoch is not relay.epoch:
            template = self._template = relay.welcome()
        c.enqueue(template._frame(c.user, c.device, (<Grants>c.grants).expires, channels,
                                  resumed, request_id, c.pending_live))
        if channels:    # none: nothing to deliver (go_live walks the channels alone)
            relay.subs.go_live(c, channels, c.positions)
        if self._debug(_logging.DEBUG):     # no dict of extras built per connect
            _session_log.debug("connected", extra={"user": c.user, "device": c.device})
