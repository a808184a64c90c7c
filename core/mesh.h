/* Records between workers (core/mesh.pyx): kinds and the packed heads of the
 * per-message records.  Little-endian on the wire between nodes too
 * (server/nodes.py carries the same records over NATS): the heads are read
 * and written as native structs, so only a little-endian build is allowed.
 */
#ifndef FENGHUO_MESH_H
#define FENGHUO_MESH_H

#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fenghuo's mesh records are little-endian native structs"
#endif

#define MESH_MESSAGE ((uint8_t)'M')
#define MESH_PUBLISH ((uint8_t)'P')
#define MESH_ANSWER ((uint8_t)'A')
#define MESH_FRAME ((uint8_t)'F')
#define MESH_USER ((uint8_t)'U')
#define MESH_HELLO ((uint8_t)'H')
#define MESH_CONTROL ((uint8_t)'C')

#pragma pack(push, 1)
typedef struct { uint8_t kind; uint64_t seq; uint16_t channel_len; } mesh_message_head;
typedef struct {
    uint8_t kind; uint64_t connection; uint32_t request_id; double t_recv;
    uint16_t sender_len; uint16_t channel_len;
} mesh_publish_head;
typedef struct { uint8_t kind; uint64_t connection; } mesh_connection_head;
#pragma pack(pop)

_Static_assert(sizeof(mesh_message_head) == 11, "M head is <BQH");
_Static_assert(sizeof(mesh_publish_head) == 25, "P head is <BQIdHH");
_Static_assert(sizeof(mesh_connection_head) == 9, "A/F head is <BQ");

#endif
