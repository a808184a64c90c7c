#ifndef FENGHUO_HTON_H
#define FENGHUO_HTON_H
#include <stdint.h>
#include <string.h>
#include <endian.h>

static inline uint16_t unpack_u16(const char *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t unpack_u32(const char *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t unpack_u64(const char *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void pack_u16(char *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void pack_u32(char *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void pack_u64(char *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
#endif
