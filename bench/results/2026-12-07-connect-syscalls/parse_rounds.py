"""Ratios, CPU per connect and load per build from a rounds.sh output: python3 parse_rounds.py cpu-rounds.txt"""
import re, statistics, sys
rows: dict[str, list[tuple[float, ...]]] = {}
build: str | None = None
for line in open(sys.argv[1]):
    head = re.match(r"== (\w+) pair (\d+) ", line)
    if head:
        build = head.group(1)
        continue
    m = re.search(r"fenghuo ([\d.]+) us, redis-server ([\d.]+) us: .* ([\d.]+)x redis-server's \(load average ([\d.]+)\); "
                  r"user/system fenghuo ([\d.]+)/([\d.]+) us", line)
    if m and build:
        rows.setdefault(build, []).append(tuple(float(x) for x in m.groups()))
for name, rs in rows.items():
    ratios = [r[2] for r in rs]
    print(f"{name}: {len(rs)} rounds, ratio {min(ratios):.2f}-{max(ratios):.2f}x median {statistics.median(ratios):.2f}x; "
          f"fenghuo {statistics.median(r[0] for r in rs):.1f} us (user {statistics.median(r[4] for r in rs):.1f}, "
          f"system {statistics.median(r[5] for r in rs):.1f}), redis-server {statistics.median(r[1] for r in rs):.1f} us (medians); "
          f"load {min(r[3] for r in rs):.1f}-{max(r[3] for r in rs):.1f}; ratios {', '.join(f'{x:.2f}' for x in ratios)}")
