# fenghuo's compiled core: one extension, its parts included in dependency
# order.  Declarations are in _core.pxd (and the part .pxd files it includes).

cimport cython

include "clock.pxi"
include "codec.pyx"
include "ring.pyx"
include "shm.pyx"
include "presence.pyx"
include "metrics.pyx"
include "dedupe.pyx"
include "mask.pyx"
include "token.pyx"
include "admission.pyx"
include "hub.pyx"
include "transports.pyx"
include "devices.pyx"
include "welcome.pyx"
include "hello.pyx"
include "mesh.pyx"
include "records.pyx"
include "writer.pyx"
