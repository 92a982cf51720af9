#!/usr/bin/env python3
"""Renders bench/run's results as Markdown tables: the IMAP phases, then
those of the phases the run had: IMAP logins with TLS 1.3 resumption, POP3
logins, half-open handshakes (memory), the reconnect storm.

Usage: report.py RESULTS.jsonl

Each input line is one peer's record as bench/run writes it:
  {"proxy": "haproxy", "logins": {loadgen logins JSON} | null,
   "proxy_cpu_ms": N | null, "helper_cpu_ms": N | null,
   "resumed": {loadgen logins --resume JSON} | null,
   "resumed_cpu_ms": N | null, "resumed_helper_cpu_ms": N | null,
   "resumed_skipped": "why" | null,
   "pop3": {loadgen pop3 JSON} | null, "pop3_cpu_ms": N | null,
   "pop3_helper_cpu_ms": N | null, "pop3_skipped": "why" | null,
   "silent": {loadgen halfopen --bytes 0 JSON} | null,
   "silent_pss_before_kib": N | null, "silent_pss_after_kib": N | null,
   "halfopen": {loadgen halfopen JSON} | null,
   "halfopen_pss_before_kib": N | null, "halfopen_pss_after_kib": N | null,
   "halfopen_skipped": "why" | null,
   "storm": {loadgen storm JSON} | null,
   "storm_machine": {"samples", "secs", "longest_saturated_s", "peak_busy",
                     "mean_busy"} | null,
   "storm_skipped": "why" | null,
   "fetch": {loadgen fetch JSON} | null, "fetch_repeat": N,
   "fetch_cpu_ms": N | null, "idle": {loadgen idle JSON} | null,
   "pss_before_kib": N | null, "pss_after_kib": N | null}
The keys of the resumed, POP3, half-open and storm phases are absent from
records of a run without that phase. Every metric column but the load
generator's own CPU (and the share of resumed handshakes, and counts) shows
the ratio to HAProxy's figure from the same run; footnotes list errors and
failed or skipped phases.
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
RESUMED_COLUMNS = [
    ("resumed logins/s", "logins_per_sec", True),
    ("p50 ms", "p50_ms", True),
    ("p99 ms", "p99_ms", True),
    ("CPU ms/login", "cpu_ms_per_login", True),
    ("CPU vs full handshakes", "cpu_vs_full", True),
    ("loadgen CPU ms/login", "loadgen_cpu_ms_per_login", False),
    ("share resumed", "share_resumed", False),
]
HALFOPEN_COLUMNS = [
    ("KiB/half-open handshake", "kib_per_halfopen", True),
    ("KiB/silent connection", "kib_per_silent", True),
    ("closed by the peer", "closed_by_peer", False),
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


def resumed_metrics(r):
    """The resumed logins table's figures: as for logins, plus the share of
    handshakes that resumed and the CPU per login against full handshakes."""
    resumed = r.get("resumed")
    m = login_metrics(resumed, r.get("resumed_cpu_ms"))
    if resumed and resumed.get("logins"):
        # Each loop's first connection has no ticket to offer yet.
        could = resumed["logins"] - resumed.get("concurrency", 0)
        if could > 0:
            m["share_resumed"] = resumed["resumed"] / could
        full = login_metrics(r.get("logins"), r.get("proxy_cpu_ms"))
        if full.get("cpu_ms_per_login") and "cpu_ms_per_login" in m:
            m["cpu_vs_full"] = m["cpu_ms_per_login"] / full["cpu_ms_per_login"]
    return m


def kib_per_connection(run, before, after):
    """PSS growth per connection still open when the peer was sampled."""
    if run and run.get("open_at_ready") and before is not None and after is not None:
        return (after - before) / run["open_at_ready"]
    return None


def halfopen_metrics(r):
    m = {}
    half = kib_per_connection(r.get("halfopen"), r.get("halfopen_pss_before_kib"), r.get("halfopen_pss_after_kib"))
    silent = kib_per_connection(r.get("silent"), r.get("silent_pss_before_kib"), r.get("silent_pss_after_kib"))
    if half is not None:
        m["kib_per_halfopen"] = half
    if silent is not None:
        m["kib_per_silent"] = silent
    runs = [x for x in (r.get("halfopen"), r.get("silent")) if x]
    if runs:
        m["closed_by_peer"] = sum(x["closed_by_peer"] for x in runs)
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


def halfopen_footnotes(r):
    notes = []
    name = r["proxy"]
    if r.get("halfopen_skipped"):
        return [f"{name}: skipped: {r['halfopen_skipped']}"]
    for key, what in (("silent", "silent connections"), ("halfopen", "half-open handshakes")):
        run = r.get(key)
        if run is None:
            notes.append(f"{name}: the {what} run failed (see the log above)")
            continue
        if run.get("failed"):
            notes.append(f"{name}: {run['failed']} {what} failed to open")
        if run.get("closed_by_peer"):
            notes.append(f"{name}: closed {run['closed_by_peer']} of the {run['connections']} {what} "
                         f"({run['closed_during_hold']} during the hold)")
    return notes


def seconds(x):
    return "—" if x is None else f"{x:.2f}"


def ratio_note(x, base):
    return f" ({x / base:.2f}×)" if x is not None and base else ""


def render_storm(records):
    """The storm table: one row per peer that ran or skipped the storm."""
    base = next((r.get("storm") for r in records if r["proxy"] == BASELINE), None) or {}
    lines = [
        "| proxy | affected | told p50 / p99 s | all back p50 / p99 / max s | failed tries "
        "| never back | machine saturated | proxy CPU s | loadgen CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in records:
        name = r["proxy"]
        storm, machine = r.get("storm"), r.get("storm_machine")
        if r.get("storm_skipped"):
            notes.append(f"{name}: skipped: {r['storm_skipped']}")
            continue
        if storm is None:
            lines.append(f"| {name} |" + " — |" * 8)
            notes.append(f"{name}: the storm phase failed (see the log above)")
            continue
        b = base if name != BASELINE else {}
        back = (f"{seconds(storm['back_p50_s'])} / {seconds(storm['back_p99_s'])}"
                f"{ratio_note(storm['back_p99_s'], b.get('back_p99_s'))} / {seconds(storm['back_max_s'])}"
                f"{ratio_note(storm['back_max_s'], b.get('back_max_s'))}")
        proxy_cpu = "—"
        if machine:
            busy = f"peak {machine['peak_busy']:.0%}, mean {machine['mean_busy']:.0%}"
            if machine["longest_saturated_s"] > 0:
                saturated = f"{machine['longest_saturated_s']:.1f} s ({busy})"
            else:
                saturated = f"no ({busy})"
            proxy_cpu = f"{machine['peer_cpu_s']:.1f}"
            if machine.get("helper_cpu_s"):
                notes.append(f"{name}: {helper_name(name)} used a further {machine['helper_cpu_s']:.1f} CPU s")
            # What the machine spent beyond the bench's own processes.
            own = machine["peer_cpu_s"] + machine["backend_cpu_s"] + machine["helper_cpu_s"] + storm["loadgen_cpu_ms"] / 1000
            other = machine["busy_cpu_s"] - own
            capacity = machine["secs"] * machine["cpus"]
            if capacity and other > 0.1 * capacity:
                notes.append(f"{name}: processes outside the benchmark used about {other:.0f} of the "
                             f"{capacity:.0f} CPU s while the storm was followed ({other / capacity:.0%} of "
                             "the machine); the saturation figure includes them")
            if machine.get("tick_share", 1) < 0.9:
                notes.append(f"{name}: the kernel counted only {machine['tick_share']:.0%} of the clock's CPU ticks "
                             "while the storm was followed; busy time is taken as clock time less idle time")
        else:
            saturated = "—"
        lines.append(
            f"| {name} | {storm['affected']} of {storm['sessions']} "
            f"| {seconds(storm['told_p50_s'])} / {seconds(storm['told_p99_s'])} | {back} "
            f"| {storm['failed_tries']} | {storm['never_back']} | {saturated} "
            f"| {proxy_cpu} | {storm['loadgen_cpu_ms'] / 1000:.1f} |"
        )
        if storm.get("setup_failed"):
            notes.append(f"{name}: {storm['setup_failed']} sessions failed to reach IDLE before the kill")
        if storm.get("dropped_before_kill"):
            notes.append(f"{name}: {storm['dropped_before_kill']} sessions were closed before the kill")
        if storm.get("failures"):
            notes.append(f"{name}: failed tries saw: " + "; ".join(f"`{f}`" for f in storm["failures"]))
    kills = [r["storm"] for r in records if r.get("storm") and "kill_ms" in r["storm"]]
    if kills:
        counts = sorted({k["killed"] for k in kills})
        spans = sorted(k["kill_ms"] for k in kills)
        span = f"{spans[0]:.0f}–{spans[-1]:.0f}" if f"{spans[0]:.0f}" != f"{spans[-1]:.0f}" else f"{spans[0]:.0f}"
        notes.append(f"SIGKILL reached backend B's {'/'.join(map(str, counts))} processes within "
                     f"{span} ms of the first; *told* counts from the first")
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    return lines


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
            if key == "share_resumed":
                cell = f"{m[key]:.1%}"
            elif isinstance(m[key], int):
                cell = str(m[key])
            else:
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

    resumed_records = [r for r in records if "resumed" in r]
    if resumed_records:
        resumed_table = {r["proxy"]: resumed_metrics(r) for r in resumed_records}
        resumed_notes = []
        for r in resumed_records:
            resumed = r.get("resumed")
            if r.get("resumed_skipped"):
                resumed_notes.append(f"{r['proxy']}: skipped: {r['resumed_skipped']}")
            elif resumed is None:
                resumed_notes.append(f"{r['proxy']}: the resumed logins phase failed (see the log above)")
            elif resumed.get("errors"):
                resumed_notes.append(f"{r['proxy']}: {resumed['errors']} login errors")
            if r.get("resumed_helper_cpu_ms") is not None and resumed and resumed.get("logins"):
                per_login = r["resumed_helper_cpu_ms"] / resumed["logins"]
                resumed_notes.append(f"{r['proxy']}: {helper_name(r['proxy'])} used a further "
                                     f"{number(per_login)} CPU ms/login, not included above")
        lines += ["", "IMAP logins with TLS 1.3 resumption: as above, but each loop keeps the session "
                  "tickets it receives and offers one on its next connection (its first is a full "
                  "handshake); *share resumed*: of the handshakes after each loop's first, those that "
                  "did resume; *CPU vs full handshakes* divides the peer's CPU ms/login by its own in the logins phase.", ""]
        shown = [r for r in resumed_records if not r.get("resumed_skipped")]
        lines += render(shown, RESUMED_COLUMNS, resumed_table, resumed_notes)

    pop3_records = [r for r in records if "pop3" in r]
    if pop3_records:
        pop3_table = {r["proxy"]: login_metrics(r.get("pop3"), r.get("pop3_cpu_ms")) for r in pop3_records}
        pop3_notes = [n for r in pop3_records for n in pop3_footnotes(r)]
        lines += ["", "POP3 logins: connect, full TLS handshake (none for `direct`), AUTH PLAIN "
                  "with an initial response (or USER/PASS where noted), STAT, QUIT.", ""]
        lines += render(pop3_records, POP3_COLUMNS, pop3_table, pop3_notes)

    halfopen_records = [r for r in records if "halfopen" in r]
    if halfopen_records:
        shown = [r for r in halfopen_records if not r.get("halfopen_skipped")]
        halfopen_table = {r["proxy"]: halfopen_metrics(r) for r in shown}
        halfopen_notes = [n for r in halfopen_records for n in halfopen_footnotes(r)]
        counts = {x["connections"] for r in shown for x in (r.get("halfopen"), r.get("silent")) if x}
        held = "/".join(str(c) for c in sorted(counts)) or "the"
        first = next((r["halfopen"] for r in shown if r.get("halfopen")), None)
        sent = f"the first {first['bytes']} bytes of" if first else "part of"
        lines += ["", f"Half-open handshakes: growth of the peer's PSS per connection, {held} connections "
                  f"held at once on a freshly started peer, each having sent {sent} a 16389-byte "
                  "ClientHello record; for reference, the same number of connections that sent nothing.", ""]
        lines += render(shown, HALFOPEN_COLUMNS, halfopen_table, halfopen_notes)

    storm_records = [r for r in records if "storm" in r]
    if storm_records:
        deadline = next((r["storm"]["deadline_secs"] for r in storm_records if r.get("storm")), None)
        lines += ["", "Reconnect storm: sessions idling through the peer when backend B is SIGKILLed; "
                  "*told*: from the kill until a session gets `* BYE` or its connection closes; "
                  "*back*: until it is in IDLE again (back-off 100 ms ±50 %, doubling to 2 s); "
                  f"*never back*: told but not back within {deadline or '?'} s; "
                  "*machine saturated*: the longest stretch with less than 5 % of the CPU idle "
                  "(sampled each 0.5 s); *proxy CPU s*: the peer's CPU over the same time.", ""]
        lines += render_storm(storm_records)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
