/* Shared-memory SPSC ring (core/shm.pyx): the layout of the shared header,
 * the atomics both processes use on it, and the eventfd/memfd system calls.
 *
 * The header is one page at the start of the mapping; records start at
 * SHM_DATA_OFFSET.  Each counter lives on its own 128-byte line (two cache
 * lines: x86's adjacent-line prefetcher pulls pairs), so the producer writing
 * `head` never invalidates the line the consumer writes `tail` on.
 */
#ifndef FENGHUO_SHM_H
#define FENGHUO_SHM_H

#include <stdint.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/eventfd.h>

#define SHM_MAGIC 0x474e495248534846ULL   /* "FHSHRING" read little-endian */
#define SHM_VERSION 1
#define SHM_LINE 128
#define SHM_DATA_OFFSET 4096
/* A record is a u32 length, its bytes, then padding to 8 bytes. */
#define SHM_RECORD_HEADER 4
#define SHM_ALIGN 8
/* Length written where a record did not fit before the end: skip to offset 0. */
#define SHM_WRAP 0xFFFFFFFFu

typedef struct {
    /* Written once by the creator. */
    uint64_t magic;
    uint32_t version;
    uint32_t data_offset;
    uint64_t capacity;
    /* Written by the producer: bytes ever written (records, padding, wrap skips). */
    _Alignas(SHM_LINE) uint64_t head;
    /* Written by the consumer: bytes ever released. */
    _Alignas(SHM_LINE) uint64_t tail;
    /* 1: the consumer went back to its loop and waits for data_fd. */
    _Alignas(SHM_LINE) uint32_t consumer_sleeping;
    /* 1: the producer found the ring full and waits for space_fd ... */
    _Alignas(SHM_LINE) uint32_t producer_waiting;
    /* ... until `tail` reaches this value. */
    uint64_t space_wanted;
} shm_header;

_Static_assert(sizeof(shm_header) <= SHM_DATA_OFFSET, "shm header must fit its page");

static inline uint64_t shm_load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t shm_load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void shm_store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void shm_store_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
/* A seq_cst store: a release store that is also ordered before later seq_cst loads. */
static inline void shm_store_seq_cst(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

static inline uint32_t shm_flag_load(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t shm_flag_load_seq_cst(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void shm_flag_store(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t shm_flag_take(uint32_t *p) { return __atomic_exchange_n(p, 0, __ATOMIC_ACQ_REL); }
static inline void shm_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Record lengths: same machine on both sides, so native byte order. */
static inline uint32_t shm_get_u32(const char *p) { return *(const uint32_t *)p; }
static inline void shm_put_u32(char *p, uint32_t v) { *(uint32_t *)p = v; }

/* Add 1 to an eventfd.  A full counter (EAGAIN) already means "readable";
 * any other failure (a closed peer fd) leaves nothing to wake. */
static inline int shm_signal(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof one) == (ssize_t)sizeof one;
}

/* Read and reset an eventfd; 0 when it was not signalled (EAGAIN). */
static inline uint64_t shm_consume_signal(int fd) {
    uint64_t value = 0;
    if (read(fd, &value, sizeof value) != (ssize_t)sizeof value)
        return 0;
    return value;
}

#endif
