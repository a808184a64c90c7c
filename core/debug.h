/* CORE_DEBUG is set by setup.py: 1 under FENGHUO_DEBUG=1, else 0. */
#ifndef CORE_DEBUG
#define CORE_DEBUG 0
#endif
