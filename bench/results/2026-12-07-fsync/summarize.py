"""Tabulate the tail-r*-*.json and m2m-*-r*-*.json of alternate.sh (python summarize.py SET)."""
import glob
import sys
import json
import os
import re

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), sys.argv[1])
print("| round | build | target | load | p50 ms | p99 ms | p99.9 ms | relay CPU / CPU wait ms/s | "
      "writer CPU / CPU wait ms/s | batches | wait mean (p99 ≤) ms | write mean (p99 ≤) ms | handback mean (p99 ≤) ms |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(HERE, "tail-r*-*.json"))):
    found = re.search(r"tail-r(\d+)-(\w+)\.json", path)
    assert found
    r, side = found.groups()
    for run in json.load(open(path))["runs"]:
        lat, s = run["latency_ms"], run["relay"]
        store = ["-"] * 4
        if "store_wait_count" in s:
            store = [str(s["store_wait_count"])] + [
                f"{s[f'store_{k}_mean_ms']:.2f} ({s[f'store_{k}_p99_le_ms']:g})" for k in ("wait", "write", "handback")]
        writer = (f"{s['writer_cpu_ms_per_s']:.0f} / {s['writer_cpu_wait_ms_per_s']:.0f}"
                  if "writer_cpu_ms_per_s" in s else "-")
        print(f"| {r} | {side} | {run['target']} | {run['loadavg']:.1f} | {lat['50']:.1f} | {lat['99']:.1f} | "
              f"{lat['99.9']:.1f} | {s['cpu_ms_per_s']:.0f} / {s['cpu_wait_ms_per_s']:.0f} | {writer} | "
              + " | ".join(store) + " |")
print()
print("| round | build | always deliveries/s | memory deliveries/s | always ÷ memory | CPU a publish always / memory µs |")
print("|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(HERE, "m2m-always-r*-*.json"))):
    found = re.search(r"m2m-always-r(\d+)-(\w+)\.json", path)
    assert found
    r, side = found.groups()
    a = json.load(open(path))
    m = json.load(open(path.replace("m2m-always", "m2m-memory")))
    def get(d, k):
        return d.get(k, d.get("result", {}).get(k))
    da, dm = get(a, "deliveries_per_s"), get(m, "deliveries_per_s")
    print(f"| {r} | {side} | {da:,.0f} | {dm:,.0f} | {da / dm:.2f} | "
          f"{a['extra']['server_cpu_us_per_publish']:.1f} / {m['extra']['server_cpu_us_per_publish']:.1f} |")
