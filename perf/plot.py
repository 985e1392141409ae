#!/usr/bin/env python3
"""Plot one tabbify-perf result file: usage: plot.py RESULT.json OUT.png

One panel per metric; a bar per implementation at its median, a dot per round, and
FAILED written where an implementation produced no result."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = [
    ("tcp1_gbps", "TCP 1 stream (Gbit/s)"),
    ("tcp4_gbps", "TCP 4 streams (Gbit/s)"),
    ("udp_delivered_gbps", "UDP delivered (Gbit/s)"),
    ("ping_avg_ms", "idle ping RTT (ms, lower is better)"),
]
COLORS = {"ours": "#d62728", "stock": "#1f77b4", "veth": "#7f7f7f"}


def main(src, dst):
    with open(src) as f:
        run = json.load(f)
    impls = run["implementations"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.8))
    for ax, (key, title) in zip(axes, METRICS):
        names = [i["name"] for i in impls]
        medians = [i["median"].get(key) for i in impls]
        xs = range(len(impls))
        ax.bar(
            xs,
            [m or 0 for m in medians],
            color=[COLORS.get(i["kind"], "#333333") for i in impls],
            alpha=0.8,
        )
        top = max([m for m in medians if m] or [1])
        for x, impl, med in zip(xs, impls, medians):
            rounds = [r["values"].get(key) for r in impl["rounds"]]
            ax.plot([x] * len([v for v in rounds if v is not None]),
                    [v for v in rounds if v is not None], "k.", markersize=4)
            if med is None:
                ax.text(x, top * 0.05, "FAILED", rotation=90, ha="center", va="bottom",
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
