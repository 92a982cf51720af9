#!/usr/bin/env python3
"""Renders bench/run's results as Markdown tables: the IMAP phases, then
(when the run had a POP3 phase) the POP3 logins.

Usage: report.py RESULTS.jsonl

Each input line is one peer's record as bench/run writes it:
  {"proxy": "haproxy", "logins": {loadgen logins JSON} | null,
   "proxy_cpu_ms": N | null, "helper_cpu_ms": N | null,
   "pop3": {loadgen pop3 JSON} | null, "pop3_cpu_ms": N | null,
   "pop3_helper_cpu_ms": N | null, "pop3_skipped": "why" | null,
   "fetch": {loadgen fetch JSON} | null, "fetch_repeat": N,
   "fetch_cpu_ms": N | null, "idle": {loadgen idle JSON} | null,
   "pss_before_kib": N | null, "pss_after_kib": N | null}
The POP3 keys are absent from records of a run without the POP3 phase.
Every metric column but the load generator's own CPU shows the ratio to
HAProxy's figure from the same run; footnotes list errors and failed or
skipped phases.
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
POP3_COLUMNS = [
    ("POP3 logins/s", "logins_per_sec", True),
    ("p50 ms", "p50_ms", True),
    ("p99 ms", "p99_ms", True),
    ("CPU ms/login", "cpu_ms_per_login", True),
    ("loadgen CPU ms/login", "loadgen_cpu_ms_per_login", False),
]


def helper_name(proxy):
    """What a peer's helper process is: nginx's auth_http service, or the
    cluster store of `postern-cluster`."""
    if proxy == "postern-cluster":
        return "its cluster store (redis-server)"
    return "its auth_http helper (Python)"


def login_metrics(logins, cpu_ms):
    """Rate, latency and CPU per login of a logins or pop3 phase."""
    m = {}
    if logins and logins.get("logins"):
        n = logins["logins"]
        m["logins_per_sec"] = logins["logins_per_sec"]
        m["p50_ms"] = logins["p50_ms"]
        m["p99_ms"] = logins["p99_ms"]
        m["loadgen_cpu_ms_per_login"] = logins["loadgen_cpu_ms"] / n
        if cpu_ms is not None:
            m["cpu_ms_per_login"] = cpu_ms / n
    return m


def metrics(r):
    """The IMAP table's figures for one record; absent ones are left out."""
    m = login_metrics(r.get("logins"), r.get("proxy_cpu_ms"))
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
        notes.append(f"{name}: {helper_name(name)} used a further {number(per_login)} CPU ms/login, not included above")
    return notes


def pop3_footnotes(r):
    notes = []
    name = r["proxy"]
    pop3 = r.get("pop3") or {}
    if r.get("pop3_skipped"):
        notes.append(f"{name}: POP3 phase skipped: {r['pop3_skipped']}")
    elif r.get("pop3") is None:
        notes.append(f"{name}: the POP3 phase failed (see the log above)")
    if pop3.get("auth") == "user":
        notes.append(f"{name}: logs in with USER/PASS, not AUTH PLAIN")
    if pop3.get("errors"):
        notes.append(f"{name}: {pop3['errors']} POP3 login errors")
    if r.get("pop3_helper_cpu_ms") is not None and pop3.get("logins"):
        per_login = r["pop3_helper_cpu_ms"] / pop3["logins"]
        notes.append(f"{name}: {helper_name(name)} used a further {number(per_login)} CPU ms/login, not included above")
    return notes


def render(records, columns, table, notes):
    """One Markdown table: a row per record, ratios to the baseline's row."""
    base = table.get(BASELINE, {})
    lines = [
        "| proxy | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for r in records:
        m = table[r["proxy"]]
        cells = []
        for _, key, ratio in columns:
            if key not in m:
                cells.append("—")
                continue
            cell = number(m[key])
            if ratio and base.get(key) and r["proxy"] != BASELINE:
                cell += f" ({m[key] / base[key]:.2f}×)"
            cells.append(cell)
        lines.append(f"| {r['proxy']} | " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    return lines


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    table = {r["proxy"]: metrics(r) for r in records}
    notes = [n for r in records for n in footnotes(r)]
    lines = render(records, COLUMNS, table, notes)

    pop3_records = [r for r in records if "pop3" in r]
    if pop3_records:
        pop3_table = {r["proxy"]: login_metrics(r.get("pop3"), r.get("pop3_cpu_ms")) for r in pop3_records}
        pop3_notes = [n for r in pop3_records for n in pop3_footnotes(r)]
        lines += ["", "POP3 logins: connect, full TLS handshake (none for `direct`), AUTH PLAIN "
                  "with an initial response (or USER/PASS where noted), STAT, QUIT.", ""]
        lines += render(pop3_records, POP3_COLUMNS, pop3_table, pop3_notes)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
