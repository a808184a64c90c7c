# Who is online in this process: user id -> their connections, one per device
# id (server/devices.py says why the shape).  Compiled: every HELLO adds one
# (HelloPath.attach) and every close removes one; as a Python class the add
# was a frame and about 2,000 instructions of a connect + HELLO (callgrind,
# python -m bench connect-cost; bench/results/2026-12-06-connect).

# The device of the server API's sessions (server/api.py): they act for a user
# without that user being online, so they are not counted, and only a token
# with the ``api`` role may use it (HelloPath.run).  SERVICE_DEVICE to Python.
cdef str _SERVICE_DEVICE = "fenghuo-api"
SERVICE_DEVICE = _SERVICE_DEVICE


@cython.final
cdef class Devices:
    """user id -> the user's sessions in this process, at most one per device id.

    Adding and removing a session costs the same however many devices its user
    has; one device is stored as the session itself (no container at all), a
    second one makes a dict keyed by device id, which is also how a newer
    connection of a device finds the older one it replaces (docs/PROTOCOL.md §3.2).
    """

    def __cinit__(self):
        self._by_user = {}

    cpdef object add(self, Connection session):
        """Register ``session``; the session of the same user and device it displaces, if any."""
        cdef str user = session.user
        cdef str device = session.device
        cdef dict devices
        held = self._by_user.get(user)
        if held is None:
            self._by_user[user] = session
            return None
        if type(held) is not dict:
            if (<Connection>held).device == device:
                self._by_user[user] = session
                return held
            held = self._by_user[user] = {(<Connection>held).device: held}
        devices = <dict>held
        replaced = devices.get(device)
        devices[device] = session
        return replaced

    cpdef bint remove(self, Connection session) except -1:
        """Forget ``session``; False if it was not registered (never, or displaced)."""
        cdef str user = session.user
        cdef dict devices
        held = self._by_user.get(user)
        if held is session:
            del self._by_user[user]
            return True
        if type(held) is not dict:
            return False
        devices = <dict>held
        if devices.get(session.device) is not session:
            return False
        del devices[session.device]
        if len(devices) == 1:
            for last in devices.values():
                self._by_user[user] = last
        return True

    cpdef object find(self, str user, str device):
        """``user``'s session of ``device`` here, if any."""
        held = self._by_user.get(user)
        if held is None:
            return None
        if type(held) is dict:
            return (<dict>held).get(device)
        return held if (<Connection>held).device == device else None

    cpdef tuple of(self, str user):
        """``user``'s sessions here, a snapshot (safe to iterate while sessions come and go)."""
        held = self._by_user.get(user)
        if held is None:
            return ()
        if type(held) is dict:
            return tuple((<dict>held).values())
        return (held,)

    cpdef int count(self, str user) except -1:
        """``user``'s devices online here, the server API's session not counted."""
        held = self._by_user.get(user)
        if held is None:
            return 0
        if type(held) is dict:
            return len(<dict>held) - (_SERVICE_DEVICE in <dict>held)
        return (<Connection>held).device != _SERVICE_DEVICE

    def __iter__(self):
        return iter(self._by_user)

    def __len__(self):
        return len(self._by_user)
