# Declarations of fenghuo's compiled core, one part per file, included in
# dependency order (as asyncpg's protocol.pxd).
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from cpython.pythread cimport PyThread_type_lock

from debug cimport CORE_DEBUG
from hton cimport *
from sqlite cimport *

include "consts.pxi"
include "codec.pxd"
include "ring.pxd"
include "shm.pxd"
include "presence.pxd"
include "metrics.pxd"
include "dedupe.pxd"
include "mask.pxd"
include "token.pxd"
include "admission.pxd"
include "hub.pxd"
include "devices.pxd"
include "welcome.pxd"
include "hello.pxd"
include "mesh.pxd"
include "records.pxd"
include "writer.pxd"
