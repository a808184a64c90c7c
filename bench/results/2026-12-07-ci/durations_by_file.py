"""Aggregate pytest --durations=0 output: setup/call/teardown per file, and per relay fixture."""
import collections
import json
import re
import sys
fn = sys.argv[1]
fixtures = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {}
per_file: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
per_fix: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
tests: dict[str, set[str]] = collections.defaultdict(set)
KEYS = ("shared_relay", "api_relay", "relay", "relay_factory", "nodes", "nats_cluster")
for line in open(fn):
    m = re.match(r"\s*([\d.]+)s (setup|call|teardown)\s+(\S+?)::(\S+)", line)
    if not m:
        continue
    t, ph, f, name = m.groups()
    per_file[f][ph] += float(t)
    tests[f].add(name)
    fx = fixtures.get(f"{f}::{name}", [])
    key = next((k for k in KEYS if k in fx), "other")
    per_fix[key][ph] += float(t)
count = collections.Counter(k.split("::")[0] for k in fixtures) if fixtures else None
tot: dict[str, float] = collections.defaultdict(float)
print(f"{'file':42s} {'tests':>5s} {'setup':>7s} {'call':>7s} {'tdown':>6s} {'total':>7s}")
for f, c in sorted(per_file.items(), key=lambda kv: -sum(v for k, v in kv[1].items())):
    s = c["setup"] + c["call"] + c["teardown"]
    for phase, seconds in c.items():
        tot[phase] += seconds
    print(f"{f:42s} {count[f] if count else len(tests[f]):5d} {c['setup']:7.1f} {c['call']:7.1f} {c['teardown']:6.1f} {s:7.1f}")
print(f"{'TOTAL':42s} {sum(count.values()) if count else sum(len(v) for v in tests.values()):5d} {tot['setup']:7.1f} {tot['call']:7.1f} {tot['teardown']:6.1f} {sum(tot.values()):7.1f}")
if fixtures:
    print("\nby fixture (first of " + ", ".join(KEYS) + " a test uses)")
    for k, c in sorted(per_fix.items(), key=lambda kv: -(kv[1]['setup'] + kv[1]['call'] + kv[1]['teardown'])):
        print(f"{k:15s} setup {c['setup']:7.1f} call {c['call']:7.1f} teardown {c['teardown']:6.1f}")
