# Big-endian load/store on unaligned pointers, as asyncpg's pgproto/hton.pxd.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "hton.h":
    uint16_t unpack_u16(const char* p) nogil
    uint32_t unpack_u32(const char* p) nogil
    uint64_t unpack_u64(const char* p) nogil
    void pack_u16(char* p, uint16_t v) nogil
    void pack_u32(char* p, uint32_t v) nogil
    void pack_u64(char* p, uint64_t v) nogil
