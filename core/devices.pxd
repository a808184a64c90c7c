@cython.final
cdef class Devices:
    # user id -> the Connection itself (one device online, nearly every user)
    # or a dict device id -> Connection (several).
    cdef dict _by_user
    cpdef object add(self, Connection session)
    cpdef bint remove(self, Connection session) except -1
    cpdef object find(self, str user, str device)
    cpdef tuple of(self, str user)
    cpdef int count(self, str user) except -1
