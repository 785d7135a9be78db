#!/usr/bin/env python3
"""The side-by-side table of `scripts/test-xen --bench` (docs/PERFORMANCE.md).

Reads dom0-bench's bench.tsv: one line per run with its cycle, backend,
workload, tool (fio|iperf3), elapsed, dom0 busy and backend CPU (all in
1/100 s), and the tool's JSON on one line with its whitespace removed.
Prints two Markdown tables, each cell with one figure per cycle: the
figures with the ratios of xenbackd to the kernel's backends and to QEMU's
qdisk (within each cycle), then latency and CPU; and, when dom0-bench
counted xenbackd's system calls (syscalls-NAME.txt beside bench.tsv, from
`perf trace -s` over the run NAME-counted), those per I/O or packet.

usage: bench-table.py bench.tsv
"""
import json
import os
import sys

ALL_BACKENDS = ["xenbackd", "xenbackd-b", "kernel", "qdisk"]
ORDER = ["randread-4k", "randwrite-4k", "randread-4k-2jobs", "seqread-1m", "seqwrite-1m",
         "tcp-from-guest", "tcp-to-guest", "udp64-from-guest", "udp64-to-guest"]
LABEL = {
    "randread-4k": "4 KiB random read, QD32",
    "randwrite-4k": "4 KiB random write, QD32",
    "randread-4k-2jobs": "4 KiB random read, 2 jobs × QD32 (2 vCPUs)",
    "seqread-1m": "1 MiB sequential read, QD8",
    "seqwrite-1m": "1 MiB sequential write, QD8",
    "tcp-from-guest": "TCP guest → dom0",
    "tcp-to-guest": "TCP dom0 → guest",
    "udp64-from-guest": "UDP 64 B guest → dom0",
    "udp64-to-guest": "UDP 64 B dom0 → guest",
}


def figures(tool, doc):
    """(value, unit, p50 µs, p99 µs, operations per second) of one run:
    I/Os for fio, packets for UDP, None for TCP."""
    if tool == "fio":
        job = doc["jobs"][0]
        side = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
        pct = side["clat_ns"].get("percentile", {})
        p50 = pct.get("50.000000", 0) / 1000
        p99 = pct.get("99.000000", 0) / 1000
        if job["jobname"].endswith("-1m"):
            return side["bw_bytes"] / 1e6, "MB/s", p50, p99, side["iops"]
        return side["iops"], "IOPS", p50, p99, side["iops"]
    end = doc["end"]
    if doc["start"]["test_start"]["protocol"] == "TCP":
        return end["sum_received"]["bits_per_second"] / 1e9, "Gbit/s", None, None, None
    s = end["sum"]
    delivered = (s["packets"] - s.get("lost_packets", 0)) / s["seconds"]
    return delivered / 1e3, "kpps", None, None, delivered


def main():
    rows = {}  # (cycle, backend, workload) -> figures
    for line in open(sys.argv[1]):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 8:
            continue
        cycle, backend, workload, tool, elapsed, dom0, own, blob = parts
        try:
            value, unit, p50, p99, rate = figures(tool, json.loads(blob))
        except (ValueError, KeyError, IndexError, ZeroDivisionError) as e:
            print(f"bench-table: {backend} {workload}: unreadable result ({e})", file=sys.stderr)
            continue
        elapsed = max(int(elapsed), 1)
        # CPU per operation: CPU seconds per second over the run, divided
        # by operations per second, in µs (the run's start-up and ramp
        # count as CPU time, alike for every backend).
        per_op = (lambda ticks: 1e6 * int(ticks) / elapsed / rate) if rate else (lambda ticks: None)
        rows[(cycle, backend, workload)] = dict(value=value, unit=unit, p50=p50, p99=p99, rate=rate, elapsed=elapsed / 100,
                                                dom0=100 * int(dom0) / elapsed, own=100 * int(own) / elapsed,
                                                dom0_op=per_op(dom0), own_op=per_op(own))
    cycles = sorted({c for c, _, _ in rows}, key=int)
    # The rounds that ran; xenbackd-b (the daemon with other options, an
    # A/B in one boot) gets its ratio to xenbackd.
    backends = [b for b in ALL_BACKENDS if any(k[1] == b for k in rows)]
    others = [b for b in ("kernel", "qdisk") if b in backends] or ["kernel", "qdisk"]

    def cells(backend, workload, key, fmt):
        """The figure of each cycle, "a / b"; – where missing."""
        out = []
        for c in cycles:
            r = rows.get((c, backend, workload))
            out.append("–" if r is None or r[key] is None else fmt.format(r[key]))
        return " / ".join(out)

    def ratios(workload, other, mine="xenbackd"):
        out = []
        for c in cycles:
            a, b = rows.get((c, mine, workload)), rows.get((c, other, workload))
            out.append(f"{a['value'] / b['value']:.2f}" if a and b and b["value"] else "–")
        return " / ".join(out)

    workloads = [w for w in ORDER if any(k[1] in backends and k[2] == w for k in rows)]
    runs = " / ".join(f"cycle {c}" for c in cycles)
    print(f"Each cell: {runs}.")
    print()
    ab = "xenbackd-b" in backends
    print("| workload | unit | " + " | ".join(backends) + "".join(f" | xenbackd / {o}" for o in others)
          + (" | xenbackd-b / xenbackd" if ab else "") + " |")
    print("|---|---|" + "---|" * (len(backends) + len(others) + ab))
    for w in workloads:
        unit = next(r["unit"] for k, r in rows.items() if k[2] == w)
        fmt = "{:.0f}" if unit in ("IOPS", "MB/s") else "{:.2f}" if unit == "Gbit/s" else "{:.1f}"
        print(f"| {LABEL.get(w, w)} | {unit} | " + " | ".join(cells(b, w, "value", fmt) for b in backends)
              + "".join(f" | {ratios(w, o)}" for o in others)
              + (f" | {ratios(w, 'xenbackd', 'xenbackd-b')}" if ab else "") + " |")
    print()
    print("| workload | backend | p50 / p99 latency, µs | dom0 CPU % | backend's own CPU % "
          "| dom0 CPU µs per I/O or packet | backend's own µs per I/O or packet |")
    print("|---|---|---|---|---|---|---|")
    for w in workloads:
        for b in backends:
            if not any(k[1] == b and k[2] == w for k in rows):
                continue
            has_latency = any(r["p50"] is not None for k, r in rows.items() if k[1] == b and k[2] == w)
            lat = " · ".join(f"{cells(b, w, 'p50', '{:.0f}').split(' / ')[i]}/{cells(b, w, 'p99', '{:.0f}').split(' / ')[i]}"
                             for i in range(len(cycles))) if has_latency else "–"
            print(f"| {LABEL.get(w, w)} | {b} | {lat} | {cells(b, w, 'dom0', '{:.0f}')} | {cells(b, w, 'own', '{:.0f}')} "
                  f"| {cells(b, w, 'dom0_op', '{:.1f}')} | {cells(b, w, 'own_op', '{:.1f}')} |")

    counted_table(os.path.dirname(os.path.abspath(sys.argv[1])), rows)


def syscall_counts(path):
    """Calls by system call, summed over the threads of `perf trace -s`'s
    summary (rows: name, calls, errors, times)."""
    counts = {}
    for line in open(path, errors="replace"):
        parts = line.split()
        if len(parts) >= 3 and parts[1].isdigit() and parts[2].isdigit():
            counts[parts[0]] = counts.get(parts[0], 0) + int(parts[1])
    return counts


def counted_table(folder, rows):
    """System calls per operation of each counted run: calls over the run
    divided by its rate × elapsed time (the ramp counts, as for CPU)."""
    lines = []
    for w in ORDER:
        path = os.path.join(folder, f"syscalls-{w}.txt")
        run = rows.get(("1", "xenbackd", f"{w}-counted"))
        if not os.path.exists(path) or run is None or not run["rate"]:
            continue
        counts = syscall_counts(path)
        operations = run["rate"] * run["elapsed"]
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
        lines.append(f"| {LABEL.get(w, w)} | {sum(counts.values()) / operations:.2f} | "
                     + ", ".join(f"{name} {n / operations:.2f}" for name, n in top) + " |")
    if not lines:
        return
    print()
    print("| workload (xenbackd, counted run) | system calls per I/O or packet | the most frequent, per I/O or packet |")
    print("|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
