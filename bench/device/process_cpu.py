"""CPU of the server's processes during a load run, each on its own: which one is the limit?

The load test reports the server's CPU summed over its processes; what decides whether a machine
is GPU-bound is the busiest single process (one GIL each). This samples, every ``--every``
seconds, the server's main process and each of its children from /proc, labelled ``device``
(a device process: it has torch's CUDA libraries mapped), ``peers`` (a peer process) or
``other``, and prints one line per sample: % of one core since the previous sample.

    python bench/device/process_cpu.py --match "server.cli --config" --out process-cpu.log &
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def label(pid: int) -> str:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "spawn_main" not in cmd:
        return "other"
    return "device" if ("libtorch_cuda" in maps or "libcudart" in maps or "libtorch_cpu" in maps) else "peers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match", default="server.cli --config", help="pgrep -f pattern of the server")
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    server = None
    while server is None:
        found = subprocess.run(["pgrep", "-f", args.match], capture_output=True, text=True).stdout.split()
        server = int(found[0]) if found else None
        if server is None:
            time.sleep(1)
    last: dict[int, int] = {}
    stamp = time.monotonic()
    with args.out.open("a") as log:
        while cpu_ticks(server) is not None:
            time.sleep(args.every)
            now = time.monotonic()
            span = now - stamp
            stamp = now
            parts: dict[str, list[str]] = {}
            for pid in [server, *children(server)]:
                ticks = cpu_ticks(pid)
                if ticks is None:
                    continue
                share = 100 * (ticks - last.get(pid, ticks)) / TICKS / span if pid in last else None
                last[pid] = ticks
                if share is not None:
                    name = "main" if pid == server else label(pid)
                    parts.setdefault(name, []).append(f"{share:.0f}")
            line = " | ".join(f"{name} {', '.join(values)}" for name, values in sorted(parts.items()))
            if line:
                log.write(f"{time.strftime('%H:%M:%S')} {line}\n")
                log.flush()


if __name__ == "__main__":
    main()
