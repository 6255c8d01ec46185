#!/usr/bin/env python3
"""Prints bench/peers/ejabberd.sh's table from the raw outputs in OUT_DIR.

  table.py OUT_DIR "RATE RATE ..."

The ratio column is Skylark / ejabberd for rates (higher is better for
Skylark) and ejabberd / Skylark for costs (memory, CPU, latency: higher is
better for Skylark too), so a ratio above 1 always favours Skylark.
"""

import glob
import json
import os
import statistics
import sys

out, rates = sys.argv[1], [int(r) for r in sys.argv[2].split()]
TICK = os.sysconf("SC_CLK_TCK")


def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return json.loads(text)
    except ValueError:
        return None


def read(name):
    path = os.path.join(out, name)
    return open(path).read().split() if os.path.exists(path) else None


def tsung(rate):
    """Messages tsung's users received: total, mean and max latency, and the
    median rate over the full 10-s intervals of the traffic."""
    logs = glob.glob(os.path.join(out, "tsung-%d" % rate, "*", "tsung.log"))
    if not logs:
        return None
    counts, last = [], None
    for line in open(logs[0]):
        f = line.split()
        # stats: xmpp_msg_latency COUNT MEAN STDDEV MAX MIN MEAN_BEFORE COUNT_BEFORE
        # (the first four for this 10-s interval, the last two for all before it)
        if len(f) == 9 and f[1] == "xmpp_msg_latency":
            counts.append(int(f[2]))
            last = f
    if last is None:
        return None
    busy = [c for c in counts if c > 0]
    full = busy[1:-1] or busy
    return {
        "received": int(last[8]) + int(last[2]),
        "rate": statistics.median(full) / 10 if full else 0,
        "max_ms": float(last[5]),
    }


rows = []


def row(what, ej, sk, ratio=None, unit=""):
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return ("%.2f" % v) if v < 10 else "{:,.0f}".format(v)
        if isinstance(v, int):
            return "{:,}".format(v)
        return str(v)

    r = "-" if ratio is None else "%.2f×" % ratio
    rows.append((what, fmt(ej) + unit, fmt(sk) + unit, r))


def div(a, b):
    return a / b if a is not None and b else None


idle_ej, idle_sk = load("idle-ejabberd.json"), load("idle-skylark.json")
if idle_ej and idle_sk:
    n_sk = idle_sk["connections"] - idle_sk["failed"]
    row("idle sessions held", idle_ej["connections"], n_sk)
    b_ej, b_sk = idle_ej["bytes_per_connection"], idle_sk["server_bytes_per_connection"]
    row("server memory per idle session (bytes)", b_ej, b_sk, div(b_ej, b_sk))
    row("connects per second", idle_ej["connects_per_second"], idle_sk["connects_per_second"],
        div(idle_sk["connects_per_second"], idle_ej["connects_per_second"]))
    t_ej, t_sk = read("idle-ejabberd.time"), read("idle-skylark.time")
    if t_ej and t_sk:
        row("  load client CPU s (user+sys) / wall s", "%.1f / %.1f" % (float(t_ej[0]) + float(t_ej[1]), float(t_ej[2])),
            "%.1f / %.1f" % (float(t_sk[0]) + float(t_sk[1]), float(t_sk[2])))

bl_ej, bl_sk = load("backlog-ejabberd.json"), load("backlog-skylark.json")
if bl_ej and bl_sk:
    row("backlog: messages stored per second", bl_ej["stored_per_second"], bl_sk["stored_per_second"],
        div(bl_sk["stored_per_second"], bl_ej["stored_per_second"]))
    row("backlog: drained per second", bl_ej["drained_per_second"], bl_sk["drained_per_second"],
        div(bl_sk["drained_per_second"], bl_ej["drained_per_second"]))
    row("backlog: received / sent", "%d / %d" % (bl_ej["received"], bl_ej["messages"]),
        "%d / %d" % (bl_sk["received"], bl_sk["messages"]))

best = {"ejabberd": None, "skylark": None}
for rate in rates:
    ts, probe, mesh = tsung(rate), load("probe-%d.json" % rate), load("mesh-%d.json" % rate)
    if not (ts and probe and mesh):
        row("%d msgs/s: incomplete run" % rate, None, None)
        continue
    sk_rate = mesh["delivered"] / mesh["seconds"]
    row("%d msgs/s: achieved (msgs delivered/s)" % rate, ts["rate"], sk_rate, div(sk_rate, ts["rate"]))
    pe, ps = probe["send_to_deliver"], mesh["send_to_deliver"]
    row("  send→deliver p50 (ms)", pe.get("p50_ms"), ps["p50_ms"], div(pe.get("p50_ms"), ps["p50_ms"]))
    row("  send→deliver p99 (ms)", pe.get("p99_ms"), ps["p99_ms"], div(pe.get("p99_ms"), ps["p99_ms"]))
    row("  send→deliver max (ms): probe · tsung (all)", "%s · %s" % (pe.get("max_ms"), ts["max_ms"]), ps["max_ms"])
    row("  delivered: probe · tsung", "%d/%d · %d" % (probe["received"], probe["sent"], ts["received"]),
        "%d/%d" % (mesh["delivered"], mesh["sent"]))
    ticks_ej, ticks_sk = read("ejabberd-cpu-%d.ticks" % rate), read("skylark-cpu-%d.ticks" % rate)
    if ticks_ej and ticks_sk:
        us_ej = int(ticks_ej[0]) / TICK * 1e6 / max(1, ts["received"] + probe["received"])
        us_sk = int(ticks_sk[0]) / TICK * 1e6 / max(1, mesh["delivered"])
        row("  server CPU per delivered message (µs)", us_ej, us_sk, div(us_ej, us_sk))
    t = read("tsung-%d.time" % rate)
    if t:
        row("  tsung CPU s / wall s (load core)", "%.1f / %.1f" % (float(t[0]) + float(t[1]), float(t[2])), None)
    for name, p99, achieved in (("ejabberd", pe.get("p99_ms"), ts["rate"]), ("skylark", ps["p99_ms"], sk_rate)):
        if p99 is not None and p99 < 50 and achieved >= 0.95 * rate:
            best[name] = rate

lowest = "none of the rates run (from %d)" % min(rates) if rates else None
row("highest rate run with p99 < 50 ms (and ≥95% of it achieved)", best["ejabberd"] or lowest,
    best["skylark"] or lowest, div(best["skylark"], best["ejabberd"]))

w = [max(len(r[i]) for r in rows + [("", "ejabberd", "Skylark", "ratio")]) for i in range(4)]
print("| %s | %s | %s | %s |" % ("".ljust(w[0]), "ejabberd".rjust(w[1]), "Skylark".rjust(w[2]), "ratio".rjust(w[3])))
print("| %s | %s: | %s: | %s: |" % ("-" * w[0], "-" * (w[1] - 1), "-" * (w[2] - 1), "-" * (w[3] - 1)))
for r in rows:
    print("| %s | %s | %s | %s |" % (r[0].ljust(w[0]), r[1].rjust(w[1]), r[2].rjust(w[2]), r[3].rjust(w[3])))
