#!/usr/bin/env python3
"""Runs a command and says where the machine's CPU went while it ran, by process name.

    bench/cpu_share.py [--per N] -- COMMAND...

Samples /proc every 0.2 s and sums, per process name (comm: beam.smp, postgres,
verimail-worker, smtp-sink, ...), the CPU time used during the run. A process
that starts during the run counts from zero; one that ends counts up to its last
sample (at most 0.2 s of it is missed). With --per N it also prints the CPU
milliseconds per unit of work (e.g. per mail). Used by bench/run.sh to split the
cost of one mail between RabbitMQ, PostgreSQL, the worker and the SMTP sink.
"""

import argparse
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def snapshot():
    """pid -> (comm, cpu ticks, start time) for every process now."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        # comm is in parentheses and may hold spaces; the rest is space-separated.
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
        out[pid] = (comm, utime + stime, start)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--per", type=float, default=0, help="units of work done, for ms per unit")
    parser.add_argument("--unit", default="unit")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to run is required")

    before = snapshot()
    first = {pid: ticks for pid, (_, ticks, _) in before.items()}
    last = dict(before)
    started = time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        time.sleep(0.2)
        now = snapshot()
        for pid, entry in now.items():
            # A reused pid (a different start time) is a new process.
            if pid in before and before[pid][2] != entry[2]:
                first[pid] = 0
            last[pid] = entry
    wall = time.monotonic() - started

    by_comm = {}
    for pid, (comm, ticks, _) in last.items():
        used = ticks - first.get(pid, 0)
        if used > 0:
            by_comm[comm] = by_comm.get(comm, 0) + used
    total = sum(by_comm.values())
    print(f"cpu_share: {wall:.2f} s wall, {total / TICK:.2f} s CPU "
          f"({100 * total / TICK / wall / os.cpu_count():.0f} % of {os.cpu_count()} cores)")
    for comm, ticks in sorted(by_comm.items(), key=lambda kv: -kv[1]):
        if ticks * 100 < total:
            continue
        line = f"  {comm:<18} {ticks / TICK:7.2f} s CPU  {100 * ticks / total:5.1f} %"
        if args.per:
            line += f"  {1000 * ticks / TICK / args.per:.3f} ms per {args.unit}"
        print(line)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
