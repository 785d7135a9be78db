#!/usr/bin/env python3
"""Turns the kernel's lines about a crashed xenbackd into source lines.

A Swift runtime trap in a release build (arithmetic overflow, a failed
precondition, a force unwrap of nil) is a ud2: the process dies with SIGILL
and prints nothing, and the only trace is dom0's kernel log:
  traps: vbd-1.51712[658] trap invalid opcode ip:55e7c440ffdc sp:... error:0 in xenbackd[55e7c4129000+155b000]
  xenbackd[612]: segfault at 0 ip 000055d0c0b1d2e3 sp ... error 4 in xenbackd[55d0c0a00000+155b000]
The bracket is the executable mapping the ip fell in; with the binary's
program headers that gives the ELF address, which llvm-symbolizer turns into
"Swift runtime failure: arithmetic overflow / function / file:line".

usage: symbolize-traps.py BINARY LOGFILE...
"""
import os
import re
import shutil
import subprocess
import sys

LINE = re.compile(r"(?:traps:|segfault at).*?\bip[: ]([0-9a-f]+).* in xenbackd\[([0-9a-f]+)\+[0-9a-f]+\]")


def exec_segment(binary):
    """(offset, vaddr) of the executable PT_LOAD segment."""
    out = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD" and "E" in f[6:-1]:
            return int(f[1], 16), int(f[2], 16)
    raise SystemExit("no executable LOAD segment in " + binary)


def symbolizer():
    swift = shutil.which("swift")
    candidates = [os.path.join(os.path.dirname(os.path.realpath(swift)), "llvm-symbolizer")] if swift else []
    candidates += [shutil.which("llvm-symbolizer") or "", shutil.which("addr2line") or ""]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def demangle(name):
    """A Swift symbol, readable (swift demangle), or the line as it is."""
    if not name.startswith("$s"):
        return name
    swift = shutil.which("swift")
    if not swift:
        return name
    res = subprocess.run([swift, "demangle", "--simplified", "--compact", name], capture_output=True, text=True)
    return res.stdout.strip() or name


def main():
    binary, logs = sys.argv[1], sys.argv[2:]
    offset, vaddr = exec_segment(binary)
    tool = symbolizer()
    seen = set()
    for log in logs:
        try:
            text = open(log, encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        for m in LINE.finditer(text):
            ip, base = int(m.group(1), 16), int(m.group(2), 16)
            # The mapping starts at the segment's page-aligned file offset.
            address = ip - base + (offset & ~0xFFF) + (vaddr - offset)
            if address in seen:
                continue
            seen.add(address)
            print(f"xenbackd crashed at {address:#x}: {m.group(0)[:160]}")
            if tool:
                args = [tool, "--obj=" + binary, hex(address)] if "symbolizer" in tool else [tool, "-f", "-C", "-e", binary, hex(address)]
                res = subprocess.run(args, capture_output=True, text=True)
                for line in res.stdout.strip().splitlines():
                    print("    " + demangle(line))


if __name__ == "__main__":
    main()
