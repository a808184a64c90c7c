# HELLO (PROTOCOL §3.2) in C, from the frame to WELCOME.  Written in Python
# (server/session.py) it was about a dozen Python calls per connect, some
# 21,000 instructions of a connect + HELLO's 82,000 (python -m bench
# connect-cost).  The attach (device index, memberships, presence) is here
# too, with the device index (core/devices.pyx): as Relay.attach and Devices
# in Python they were about 3,700 instructions a connect
# (bench/results/2026-12-06-connect).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8String

import logging as _logging
from functools import partial as _partial

# The session log (server/session.py's), where "connected" is written.
_session_log = _logging.getLogger("fenghuo.session")


@cython.final
cdef class HelloPath:
    """A relay's HELLO: ``HelloPath(relay, decode, keys_of, device_bits, leeway)``, set
    as ``relay.hub.hello``; the core's Connection hands it every HELLO.

    ``schema`` is the HELLO's (server/schemas.py: its msgspec decoder; a body it
    refuses goes to ``decode``, schemas.decode_with, for MALFORMED_BODY and its
    text), ``keys_of(secret)`` the secret's HS256 keys, ``device_bits(32)`` the bits
    of a device id for a HELLO that names none (server/devices.py
    ``new_device_bits``; formatted here, codec's ``device_id``), ``leeway`` the
    seconds a token may be past its ``exp``, ``max_depth`` the control bodies'
    nesting limit (PROTOCOL §2.5).  A cluster node's HELLO ends in Python, in
    the session's ``hello_clustered``.
    """

    def __cinit__(self, relay, schema, decode, keys_of, device_bits, double leeway,
                  Py_ssize_t max_depth):
        self.relay = relay
        self._decoder = schema.decoder.decode
        self._decode = decode
        self._max_depth = max_depth
        self._keys_of = keys_of
        self._device_bits = device_bits
        self._leeway = leeway
        self._admission = relay.admission
        self._tokens = relay.tokens
        self._revocations = relay.tokens.revocations
        self._secret = None
        self._keys = ()
        self._template = None
        self._debug = _session_log.isEnabledFor
        # Made once in Relay.__init__, before this, and never replaced.
        self._users = relay.users
        self._memberships = relay.memberships
        self._subscribe = relay.subs.subscribe
        self._presence = relay.presence
        self._watchers = relay.presence.watchers

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
            grants = verify_grants(token, self._keys, self._leeway)
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
        hello = None
        if _nesting(<const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body),
                    self._max_depth) <= self._max_depth:
            try:
                hello = self._decoder(body)
            except Exception:
                pass        # refused below, by decode_with: one place for its errors
        if hello is None:
            try:
                hello = self._decode(body)
            except ProtocolError as exc:
                raise ProtocolError(exc.code, exc.message, True) from None
        cdef Grants grants = self.verify(hello.token, "HELLO")
        positions = hello.positions
        # The id formatted in C, no Python function between (a Python new_device_id()
        # around the same two calls was ~1,200 instructions a connect, callgrind).
        cdef str device = hello.device or _device_id(self._device_bits(32))
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
        self.attach(c)
        cdef tuple channels = tuple(c.subscriptions)
        if cluster is not None:
            c.hello_clustered(request_id, channels, resumed, held)
        elif c._replies is None and not c._unreleased:
            # Connection.in_turn: nothing awaited (its connection has sent nothing before).
            self.welcome(c, request_id, channels, resumed)
        else:
            c._fill(c._reserve(), _partial(self.welcome, c, request_id, channels, resumed))
        return 0

    cpdef attach(self, Connection c):
        """Register an authenticated connection (``c.user``, ``c.device`` and ``c.grants``
        set) and subscribe it to what it belongs to: its direct and group channels,
        its token's organisation units (Relay.subscribe_org_units).

        An older connection of the same user and device is closed with
        DEVICE_REPLACED (docs/PROTOCOL.md §3.2): the newer one replaces it.
        Presence (server/presence.py ``came_or_went``) is told only when someone
        watches the user or webhooks are configured: what nearly every connect
        meets is neither, and then nothing is called.
        """
        relay = self.relay
        replaced = self._users.add(c)
        if replaced is not None:
            relay.replace(replaced)
        cdef str user = c.user
        joined = self._memberships.get(user)
        if joined:
            for ch in joined:
                self._subscribe(c, ch)
        cdef tuple autos = (<Grants>c.grants).auto_subscriptions()
        if autos:
            relay.subscribe_org_units(c, autos)
        cluster = relay.cluster
        if cluster is not None:
            cluster.attached(c)
        if user in self._watchers or relay.endpoints:
            self._presence.came_or_went(c)

    cpdef welcome(self, Connection c, uint32_t request_id, tuple channels, object resumed):
        """WELCOME, then what was missed, then live: once ``channels`` are ready here."""
        relay = self.relay
        cdef WelcomeTemplate template = self._template
        if template is None or template.epoch is not relay.epoch:
            template = self._template = relay.welcome()
        frame = template._frame(c.user, c.device, (<Grants>c.grants).expires, channels,
                                resumed, request_id, c.pending_live)
        if channels and (c.positions is not None or c.pending_live is not None):
            # What it missed may follow (go_live): one write for both, from the queue.
            c.enqueue(frame)
        else:
            c.write_now(frame)
        if channels:    # none: nothing to deliver (go_live walks the channels alone)
            relay.subs.go_live(c, channels, c.positions)
        # logging.DEBUG as a constant: _logging.DEBUG is a module attribute lookup
        # per connect (~240 instructions, callgrind).  No dict of extras built either.
        if self._debug(10):
            _session_log.debug("connected", extra={"user": c.user, "device": c.device})
