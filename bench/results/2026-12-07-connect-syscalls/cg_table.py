"""Per-connect inclusive figures from callgrind profiles (callgrind_annotate --inclusive=yes)."""
import re, subprocess, sys
N = 2000
COLS = [("total", "PROGRAM TOTALS"), ("sampler timer", "TimerHandle__run "),
        ("collector", "gc_collect_main "), ("HelloPath.run", "HelloPath_run "),
        ("factory", "ProtocolFactory_3__call__ "), ("uvloop _on_listen", "UVStreamServer__on_listen "),
        ("call_soon", "Loop_13call_soon "), ("Deadlines.watch", "Deadlines_watch ")]
print("| profile | " + " | ".join(c for c, _ in COLS[:2]) + " | total without it | " + " | ".join(c for c, _ in COLS[2:]) + " |")
print("|---|" + "---:|" * (len(COLS) + 1))
for path in sys.argv[1:]:
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path], capture_output=True, text=True).stdout
    vals: dict[str, float] = {}
    for name, key in COLS:
        for line in out.splitlines():
            if key.strip() in line and (key.endswith(" ") and re.search(re.escape(key.strip()) + r" \[", line) or key == "PROGRAM TOTALS"):
                vals[name] = int(line.split()[0].replace(",", "")) / N
                break
        else:
            vals[name] = 0
    row = [vals["total"], vals["sampler timer"], vals["total"] - vals["sampler timer"]] + [vals[c] for c, _ in COLS[2:]]
    print(f"| {path.rsplit('/', 1)[-1]} | " + " | ".join(f"{v:,.0f}" for v in row) + " |")
