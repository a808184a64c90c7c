# Cython finds a module's own declarations by its full dotted name; the source
# folder is core/, not fenghuo/core/, so this dotted file points it at them.
include "_core.pxd"
