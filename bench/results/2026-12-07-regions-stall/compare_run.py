"""Figures of one regions run worked out by RouteWire.first as it was (a scan of the route from the start per search) and as indexed (views): equal, and how long each took.

    PYTHONPATH=. python bench/results/2026-12-07-regions-stall/compare_run.py [bench cluster flags]
"""
import json, sys, time
from bench import geo, cluster_regions
from bench.__main__ import main
from bench.netem import ChunkRecord

def old_first(self, a, b, after, *, message_id=None, subject=""):
    for m in self.messages.get((a, b), ()):
        if not m.subject.startswith(subject) or (message_id is not None and message_id not in m.ids):
            continue
        try:
            record = m.record
        except LookupError:
            continue
        if record.arrived_at >= after:
            return record
    return None

new_first = cluster_regions.RouteWire.first
orig = geo.figures
def both(world, run):
    t = time.perf_counter(); new = orig(world, run); t_new = time.perf_counter() - t
    cluster_regions.RouteWire.first = old_first  # type: ignore[method-assign]
    t = time.perf_counter(); old = orig(world, run); t_old = time.perf_counter() - t
    cluster_regions.RouteWire.first = new_first  # type: ignore[method-assign]
    same = json.dumps(new, sort_keys=True) == json.dumps(old, sort_keys=True)
    print(f"COMPARE: indexed {t_new:.2f} s, as before {t_old:.2f} s, identical: {same}", file=sys.stderr, flush=True)
    return new
geo.figures = both
sys.exit(main(["cluster", "--parts", "regions", *sys.argv[1:]]))
