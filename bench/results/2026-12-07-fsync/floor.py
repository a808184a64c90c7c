"""This disk's floor under the store: pwrite + fdatasync latency of a WAL-like file.

Usage: python floor.py DIR [COUNT]
       SLICE_US=100 .venv/bin/python floor.py DIR [COUNT]   (the probe's thread first asks the
       kernel for that time slice, as the relay's loop does: fenghuo.server.stalls.loop_slice)   (DIR on the filesystem the store uses; the bench's
stores go under /tmp, the same ext4 on /dev/vda as /work here).

A WAL grows by appending a commit's frames and is written again from its start once
checkpointed; each commit ends with one fdatasync (SQLite on Linux).  For commit sizes
of 1, 4, 16 and 64 pages of 4 KiB (one-to-one at 50,000 msgs/s commits about 376
records, some 15 pages, a batch), append COUNT commits to one file (wrapping to
its start at 64 MiB, as a restarted WAL) and time each pwrite+fdatasync.  Prints one
JSON line per size: p50/p90/p99/p99.9/max in ms, and the load average before and after.
"""
import json
import os
import sys
import time

WRAP = 64 << 20


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


def run(directory: str, pages: int, count: int) -> dict[str, float]:
    path = os.path.join(directory, "floor-wal.probe")
    block = os.urandom(4096 * pages)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    lat = []
    off = 0
    load0 = os.getloadavg()[0]
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            os.pwrite(fd, block, off)
            os.fdatasync(fd)
            lat.append((time.perf_counter() - t0) * 1e3)
            off = 0 if off + len(block) >= WRAP else off + len(block)
    finally:
        os.close(fd)
        os.unlink(path)
    return {"pages": pages, "count": count, "p50_ms": pct(lat, 0.5), "p90_ms": pct(lat, 0.9),
            "p99_ms": pct(lat, 0.99), "p999_ms": pct(lat, 0.999), "max_ms": max(lat),
            "over_8ms": sum(v > 8 for v in lat), "load_before": load0, "load_after": os.getloadavg()[0]}


if __name__ == "__main__":
    if os.environ.get("SLICE_US"):
        from fenghuo.server.stalls import loop_slice
        print(json.dumps({"slice_s": loop_slice(int(os.environ["SLICE_US"]))}))
    directory = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    for pages in (1, 4, 16, 64):
        print(json.dumps(run(directory, pages, count)), flush=True)
