#!/usr/bin/env python3
"""The side-by-side table of `scripts/test-xen --bench` (docs/PERFORMANCE.md).

Reads dom0-bench's bench.tsv: one line per backend and workload with
backend, workload, tool (fio|iperf3), elapsed, dom0 busy and backend CPU
(all in 1/100 s), and the tool's JSON on one line with its whitespace
removed. Prints two Markdown tables: the figures with the ratios of
xenbackd to the kernel's backends and to QEMU's qdisk, then latency and CPU.

usage: bench-table.py bench.tsv
"""
import json
import sys

BACKENDS = ["xenbackd", "xenbackd-nopoll", "kernel", "qdisk"]
HEADER = ["xenbackd", "xenbackd --poll-us 0", "kernel", "qdisk"]
ORDER = ["randread-4k", "randwrite-4k", "seqread-1m", "seqwrite-1m",
         "tcp-from-guest", "tcp-to-guest", "udp64-from-guest", "udp64-to-guest"]
LABEL = {
    "randread-4k": "4 KiB random read, QD32",
    "randwrite-4k": "4 KiB random write, QD32",
    "seqread-1m": "1 MiB sequential read, QD8",
    "seqwrite-1m": "1 MiB sequential write, QD8",
    "tcp-from-guest": "TCP guest → dom0",
    "tcp-to-guest": "TCP dom0 → guest",
    "udp64-from-guest": "UDP 64 B guest → dom0",
    "udp64-to-guest": "UDP 64 B dom0 → guest",
}


def figures(tool, doc):
    """(value, unit, p50 µs, p99 µs) of one run."""
    if tool == "fio":
        job = doc["jobs"][0]
        side = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
        pct = side["clat_ns"].get("percentile", {})
        p50 = pct.get("50.000000", 0) / 1000
        p99 = pct.get("99.000000", 0) / 1000
        if job["jobname"].endswith("-1m"):
            return side["bw_bytes"] / 1e6, "MB/s", p50, p99
        return side["iops"], "IOPS", p50, p99
    end = doc["end"]
    if doc["start"]["test_start"]["protocol"] == "TCP":
        return end["sum_received"]["bits_per_second"] / 1e9, "Gbit/s", None, None
    s = end["sum"]
    delivered = (s["packets"] - s.get("lost_packets", 0)) / s["seconds"]
    return delivered / 1e3, "kpps", None, None


def main():
    rows = {}
    for line in open(sys.argv[1]):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 7:
            continue
        backend, workload, tool, elapsed, dom0, own, blob = parts
        try:
            value, unit, p50, p99 = figures(tool, json.loads(blob))
        except (ValueError, KeyError, IndexError, ZeroDivisionError) as e:
            print(f"bench-table: {backend} {workload}: unreadable result ({e})", file=sys.stderr)
            continue
        elapsed = max(int(elapsed), 1)
        rows[(backend, workload)] = dict(value=value, unit=unit, p50=p50, p99=p99,
                                         dom0=100 * int(dom0) / elapsed, own=100 * int(own) / elapsed)

    def cell(backend, workload, key="value", fmt="{:.1f}"):
        r = rows.get((backend, workload))
        if r is None or r[key] is None:
            return "–"
        return fmt.format(r[key])

    def ratio(workload, other):
        a, b = rows.get(("xenbackd", workload)), rows.get((other, workload))
        if not a or not b or not b["value"]:
            return "–"
        return f"{a['value'] / b['value']:.2f}"

    workloads = [w for w in ORDER if any((b, w) in rows for b in BACKENDS)]
    print("| workload | unit | " + " | ".join(HEADER) + " | xenbackd / kernel | xenbackd / qdisk |")
    print("|---|---|---|---|---|---|---|---|")
    for w in workloads:
        unit = next(rows[(b, w)]["unit"] for b in BACKENDS if (b, w) in rows)
        fmt = "{:.0f}" if unit == "IOPS" else "{:.2f}" if unit == "Gbit/s" else "{:.1f}"
        print(f"| {LABEL.get(w, w)} | {unit} | " + " | ".join(cell(b, w, fmt=fmt) for b in BACKENDS)
              + f" | {ratio(w, 'kernel')} | {ratio(w, 'qdisk')} |")
    print()
    order = " · ".join(HEADER)
    print(f"| workload | p50 / p99 latency, µs ({order}) | dom0 CPU % ({order}) | backend's own CPU % ({order}) |")
    print("|---|---|---|---|")
    for w in workloads:
        lat = " · ".join(f"{cell(b, w, 'p50', '{:.0f}')}/{cell(b, w, 'p99', '{:.0f}')}" for b in BACKENDS)
        if all(rows.get((b, w), {}).get("p50") is None for b in BACKENDS):
            lat = "–"
        dom0 = " · ".join(cell(b, w, "dom0", "{:.0f}") for b in BACKENDS)
        own = " · ".join(cell(b, w, "own", "{:.0f}") for b in BACKENDS)
        print(f"| {LABEL.get(w, w)} | {lat} | {dom0} | {own} |")


if __name__ == "__main__":
    main()
