#!/usr/bin/env python3
"""Boots Xen + dom0 under qemu-system-x86_64 (TCG) for scripts/test-xen.

Every serial console line goes to --log with the seconds since QEMU started;
the test's own lines (XBTEST:, DOMU:, XENLAB:) and Xen/Linux panics are echoed
to stdout as they come. dom0 ends its test with `XBTEST: RESULT PASS|FAIL`
and reboots, which ends QEMU (-no-reboot). QEMU runs in a session of its own
and is killed by its PID at the hard limit (--timeout), or when this driver
is interrupted.

Exit status: 0 PASS, 1 FAIL, 2 no result (timeout, crash, QEMU failed).
"""
import argparse
import os
import re
import select
import signal
import subprocess
import sys
import time

ECHO = ("XBTEST:", "DOMU", "XENLAB:", "Panic on CPU", "Kernel panic", "(XEN) Xen version",
        "FATAL", "domain_crash", "BUG:", "Oops", "traps:", "segfault")
RESULT = re.compile(r"XBTEST: (?:\[[0-9.]+\] )?RESULT (PASS|FAIL)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xen", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--image", required=True, help="dom0 root filesystem (ext4), opened with snapshot=on")
    ap.add_argument("--share", required=True, help="folder exported to dom0 as 9p tag 'share'")
    ap.add_argument("--log", required=True)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--mem", default="3072")
    ap.add_argument("--dom0-mem", default="1536M")
    a = ap.parse_args()

    xen_cmdline = (f"dom0_mem={a.dom0_mem},max:{a.dom0_mem} dom0_max_vcpus=2 console=com1 com1=115200,8n1 "
                   "loglvl=all guest_loglvl=all console_timestamps=boot bootscrub=0")
    dom0_cmdline = "root=/dev/vda rw console=hvc0 earlyprintk=xen init=/sbin/xenlab-init"
    cmd = ["qemu-system-x86_64",
           # -cpu qemu64, not max: with max, TCG dom0 dies at its first exception bounce.
           "-accel", "tcg,thread=multi", "-cpu", "qemu64",
           "-m", a.mem, "-smp", "2", "-display", "none", "-monitor", "none", "-serial", "stdio",
           "-nic", "none", "-no-reboot",
           "-kernel", a.xen, "-append", xen_cmdline,
           "-initrd", f"{a.kernel} {dom0_cmdline},{a.initrd}",
           "-drive", f"file={a.image},if=virtio,format=raw,cache=unsafe,snapshot=on",
           "-virtfs", f"local,path={a.share},mount_tag=share,security_model=none,id=share"]

    t0 = time.monotonic()
    # stdin stays an open pipe (never written): QEMU's stdio backend must not see EOF.
    try:
        qemu = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as e:
        print(f"boot.py: cannot start {cmd[0]}: {e}", flush=True)
        return 2
    print(f"boot.py: QEMU pid {qemu.pid}", flush=True)

    def kill(reason):
        if qemu.poll() is None:
            print(f"boot.py: {reason}: killing QEMU (pid {qemu.pid})", flush=True)
            try:
                os.kill(qemu.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        qemu.wait()

    def on_signal(signum, _frame):
        kill(f"signal {signum}")
        sys.exit(2)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    result = None
    deadline = t0 + a.timeout
    result_deadline = None   # after RESULT, dom0 gets a little time to reboot
    pending = b""
    fd = qemu.stdout.fileno()
    with open(a.log, "w", encoding="utf-8", errors="replace") as log:
        def line_out(raw):
            nonlocal result, result_deadline
            line = raw.decode("utf-8", "replace").replace("\r", "")
            ts = time.monotonic() - t0
            log.write(f"[{ts:7.2f}] {line}\n")
            log.flush()
            if any(k in line for k in ECHO):
                print(f"  [{ts:6.1f}s] {line.strip()[:220]}", flush=True)
            m = RESULT.search(line)
            if m and result is None:
                result = m.group(1)
                result_deadline = time.monotonic() + 60

        while True:
            now = time.monotonic()
            limit = deadline if result_deadline is None else min(deadline, result_deadline)
            if now >= limit:
                kill("hard time limit" if result is None else "no reboot after the result")
                break
            ready, _, _ = select.select([fd], [], [], min(1.0, limit - now))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line_out(raw)
        if pending:
            line_out(pending)
    qemu.wait()
    print(f"boot.py: QEMU ended after {time.monotonic() - t0:.1f}s (status {qemu.returncode}), result {result}",
          flush=True)
    return {"PASS": 0, "FAIL": 1}.get(result, 2)


if __name__ == "__main__":
    sys.exit(main())
