#!/usr/bin/env python3
"""Plot one tabbify-perf result file: usage: plot.py RESULT.json OUT.png

One panel per metric; a bar per implementation at its median, a dot per round, and
FAILED (or "not available") written where an implementation produced no result. Two more
panels give Gbit/s per daemon core (both ends' CPU, all threads) during TCP 1 stream and
UDP, with the crypto bound (ChaCha20-Poly1305 seal + open, one core) as a dashed line.
Result files written before those fields existed plot without the two panels."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (field holding medians per metric, metric key, title)
METRICS = [
    ("median", "tcp1_gbps", "TCP 1 stream (Gbit/s)"),
    ("median", "tcp4_gbps", "TCP 4 streams (Gbit/s)"),
    ("median", "udp_delivered_gbps", "UDP delivered, GSO sender (Gbit/s)"),
    ("median", "ping_avg_ms", "idle ping RTT (ms, lower is better)"),
    ("median_gbps_per_core", "tcp1_gbps", "Gbit/s per daemon core, TCP 1"),
    ("median_gbps_per_core", "udp_delivered_gbps", "Gbit/s per daemon core, UDP"),
]
COLORS = {"ours": "#d62728", "stock": "#1f77b4", "veth": "#7f7f7f"}


def round_values(impl, field, key, duration):
    """Per-round values of one panel (per-core figures are recomputed from the rounds)."""
    out = []
    for r in impl["rounds"]:
        value = r["values"].get(key)
        if field == "median":
            out.append(value)
        else:
            cpu = r.get("cpu_s", {}).get(key)
            out.append(value / (cpu / duration) if value and cpu else None)
    return [v for v in out if v is not None]


def not_available(impl):
    return impl["rounds"] and all(
        r["errors"].get("setup", "").startswith("not available") for r in impl["rounds"]
    )


def main(src, dst):
    with open(src) as f:
        run = json.load(f)
    impls = run["implementations"]
    panels = [m for m in METRICS if any(m[0] in i for i in impls)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8))
    for ax, (field, key, title) in zip(axes, panels):
        names = [i["name"] for i in impls]
        medians = [i.get(field, {}).get(key) for i in impls]
        xs = range(len(impls))
        ax.bar(
            xs,
            [m or 0 for m in medians],
            color=[COLORS.get(i["kind"], "#333333") for i in impls],
            alpha=0.8,
        )
        top = max([m for m in medians if m] or [1])
        bound = run.get("crypto_bound_gbps")
        if field != "median" and bound:
            ax.axhline(bound, color="#2ca02c", linestyle="--", linewidth=1)
            ax.text(len(impls) - 0.5, bound, f"crypto bound {bound:.2f}", ha="right",
                    va="bottom", fontsize=7, color="#2ca02c")
            top = max(top, bound)
        for x, impl, med in zip(xs, impls, medians):
            rounds = round_values(impl, field, key, run["duration_s"])
            ax.plot([x] * len(rounds), rounds, "k.", markersize=4)
            if med is None:
                if impl["kind"] == "veth" and field != "median":
                    continue
                label = "not available" if not_available(impl) else "FAILED"
                ax.text(x, top * 0.05, label, rotation=90, ha="center", va="bottom",
                        color="#d62728", fontsize=9)
            else:
                ax.text(x, med, f"{med:.2f}" if key != "ping_avg_ms" else f"{med:.3f}",
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{run['timestamp']} · {run['cores']} × {run['cpu_model']} · kernel {run['kernel']} · "
        f"MTU {run['mtu']} · medians of {run['rounds']} rounds × {run['duration_s']} s",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py RESULT.json OUT.png")
    main(sys.argv[1], sys.argv[2])
