#!/usr/bin/env python3
"""Renders bench/run's results as one Markdown table.

Usage: report.py RESULTS.jsonl

Each input line is one peer's record as bench/run writes it:
  {"proxy": "haproxy", "logins": {loadgen logins JSON} | null,
   "proxy_cpu_ms": N | null, "helper_cpu_ms": N | null,
   "fetch": {loadgen fetch JSON} | null, "fetch_repeat": N,
   "fetch_cpu_ms": N | null, "idle": {loadgen idle JSON} | null,
   "pss_before_kib": N | null, "pss_after_kib": N | null}
Every metric column but the load generator's own CPU shows the ratio to HAProxy's figure from
the same run; footnotes list errors and failed phases.
"""
import json
import sys

BASELINE = "haproxy"
# (column title, key in metrics(), takes a ratio to the baseline)
COLUMNS = [
    ("logins/s", "logins_per_sec", True),
    ("p50 ms", "p50_ms", True),
    ("p99 ms", "p99_ms", True),
    ("MiB/s", "mib_per_sec", True),
    ("KiB/idle session", "kib_per_idle", True),
    ("CPU ms/login", "cpu_ms_per_login", True),
    ("CPU ms/GiB relayed", "cpu_ms_per_gib", True),
    ("loadgen CPU ms/login", "loadgen_cpu_ms_per_login", False),
]


def metrics(r):
    """The table's figures for one record; absent ones are left out."""
    m = {}
    logins = r.get("logins")
    if logins and logins.get("logins"):
        n = logins["logins"]
        m["logins_per_sec"] = logins["logins_per_sec"]
        m["p50_ms"] = logins["p50_ms"]
        m["p99_ms"] = logins["p99_ms"]
        m["loadgen_cpu_ms_per_login"] = logins["loadgen_cpu_ms"] / n
        if r.get("proxy_cpu_ms") is not None:
            m["cpu_ms_per_login"] = r["proxy_cpu_ms"] / n
    fetch = r.get("fetch")
    if fetch:
        m["mib_per_sec"] = fetch["median_mib_per_sec"]
        if r.get("fetch_cpu_ms") is not None and r.get("fetch_repeat"):
            gib = fetch["bytes"] * r["fetch_repeat"] / 2**30
            m["cpu_ms_per_gib"] = r["fetch_cpu_ms"] / gib
    idle = r.get("idle")
    before, after = r.get("pss_before_kib"), r.get("pss_after_kib")
    if idle and idle.get("sessions") and before is not None and after is not None:
        m["kib_per_idle"] = (after - before) / idle["sessions"]
    return m


def number(x):
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def footnotes(r):
    notes = []
    name = r["proxy"]
    for phase in ("logins", "fetch", "idle"):
        if r.get(phase) is None:
            notes.append(f"{name}: the {phase} phase failed (see the log above)")
    logins = r.get("logins") or {}
    if logins.get("errors"):
        notes.append(f"{name}: {logins['errors']} login errors")
    idle = r.get("idle") or {}
    if idle.get("failed"):
        notes.append(f"{name}: {idle['failed']} idle sessions failed to open; KiB/idle session is over the {idle['sessions']} that did")
    if idle.get("teardown_errors"):
        notes.append(f"{name}: {idle['teardown_errors']} idle sessions did not log out cleanly")
    if r.get("helper_cpu_ms") is not None and logins.get("logins"):
        per_login = r["helper_cpu_ms"] / logins["logins"]
        notes.append(f"{name}: its auth_http helper (Python) used a further {number(per_login)} CPU ms/login, not included above")
    return notes


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    table = {r["proxy"]: metrics(r) for r in records}
    base = table.get(BASELINE, {})

    lines = [
        "| proxy | " + " | ".join(title for title, _, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for r in records:
        m = table[r["proxy"]]
        cells = []
        for _, key, ratio in COLUMNS:
            if key not in m:
                cells.append("—")
                continue
            cell = number(m[key])
            if ratio and base.get(key) and r["proxy"] != BASELINE:
                cell += f" ({m[key] / base[key]:.2f}×)"
            cells.append(cell)
        lines.append(f"| {r['proxy']} | " + " | ".join(cells) + " |")
    notes = [n for r in records for n in footnotes(r)]
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
