"""uvloop's table of transports made cheaper (core/transports.pyx): what uvloop
uses it for still holds, and it keeps no transport alive."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

import uvloop

from fenghuo.core import TransportTable, lighten_transport_table


async def _lightened_loop_keeps_uvloops_check() -> None:
    loop = asyncio.get_running_loop()
    assert lighten_transport_table(loop) and lighten_transport_table(loop)   # once, then found
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    fd = writer.transport.get_extra_info("socket").fileno()
    # uvloop refuses to watch a descriptor a live transport uses (Loop._ensure_fd_no_transport).
    try:
        loop.add_reader(fd, lambda: None)
    except RuntimeError as exc:
        assert "is used by transport" in str(exc)
    else:
        raise AssertionError("add_reader on a live transport's descriptor was allowed")
    transport = weakref.ref(writer.transport)
    writer.close()
    await writer.wait_closed()
    for w in accepted:
        w.close()
    accepted.clear()
    del reader, writer
    await asyncio.sleep(0.05)
    gc.collect()
    # The table holds its transports weakly: closed and unreferenced, the transport is gone ...
    assert transport() is None
    # ... and its descriptor's number, reused by a plain socket, may be watched.
    # The kernel gives the lowest free number: numbers freed below ``fd`` (the
    # collection above may close sockets earlier tests left) are taken first.
    reused = [socket.socket()]
    while reused[-1].fileno() < fd and len(reused) < 10_000:
        reused.append(socket.socket())
    try:
        (same,) = [s for s in reused if s.fileno() == fd]
        loop.add_reader(same.fileno(), lambda: None)
        loop.remove_reader(same.fileno())
    finally:
        for s in reused:
            s.close()
    server.close()
    await server.wait_closed()


def test_a_lightened_uvloop_still_refuses_a_live_transports_descriptor_and_frees_closed_ones() -> None:
    uvloop.run(_lightened_loop_keeps_uvloops_check())


def test_a_table_stores_weak_references_and_reads_a_dead_one_as_missing() -> None:
    class Thing:
        pass

    table = TransportTable()
    thing = Thing()
    table[3] = thing
    assert table[3] is thing and table.get(3) is thing and 3 in table
    del thing
    gc.collect()
    assert table.get(3) is None and 3 not in table
    try:
        table[3]
    except KeyError:
        pass
    else:
        raise AssertionError("a dead entry was read")


def test_only_a_uvloop_loop_is_changed() -> None:
    loop = asyncio.SelectorEventLoop()      # it has a table of its own, left as it is
    try:
        assert not lighten_transport_table(loop)
        assert not any(isinstance(r, TransportTable) for r in gc.get_referents(loop))
    finally:
        loop.close()
