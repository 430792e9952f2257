#!/usr/bin/env python3
"""A sidecar's footprint: Envoy's start-up and idle memory with llm-failover, with a no-op Wasm
filter and with no filter at all, on `envoy/local.yaml`, at several worker counts.

For each build and `--concurrency`, rounds interleaved: Envoy is started, `/ready` polled every
10 ms, and after it answers Envoy's own CPU time (user + system, all threads: the figure least
disturbed by other processes on a shared machine) and wall time are read; after `--settle`
seconds idle, its RSS (VmRSS), peak RSS (VmHWM) and the allocator's figures (`/memory`), and its
CPU while idle (the second half of the wait).
Medians are printed as a Markdown table (`--append FILE` adds it to a report). Loopback only; every
Envoy is stopped before the next starts.

    .venv/bin/python bench/footprint.py [--rounds 3] [--concurrency 1,2,4] [--extra NAME=x.wasm]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCAL_YAML = ROOT / "envoy" / "local.yaml"
FILTER_WASM = ROOT / "dist" / "llm_failover.wasm"
NOOP_WASM = ROOT / "target" / "bench-noop" / "wasm32-wasip1" / "release" / "noop_filter.wasm"
WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def walk(node):
    """Every dict in a YAML tree."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def render(wasm: Path | None, admin: int, listener: int) -> dict:
    """envoy/local.yaml with its Wasm code replaced by `wasm` (every place it is loaded), or
    with the Wasm filters removed (`None`: plain Envoy)."""
    cfg = yaml.safe_load(LOCAL_YAML.read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    for lst in cfg["static_resources"]["listeners"]:
        lst["address"]["socket_address"]["port_value"] = listener
    if wasm is None:
        for d in list(walk(cfg)):
            # The filter's places: the HTTP filter chain and the router's upstream filters.
            for key in ("http_filters", "upstream_http_filters"):
                if isinstance(d.get(key), list):
                    d[key] = [f for f in d[key] if f.get("typed_config", {}).get("@type") != WASM_FILTER]
            # The router's upstream filters were the filter's upstream role alone.
            if d.get("upstream_http_filters") is not None and len(d["upstream_http_filters"]) <= 1:
                del d["upstream_http_filters"]
    else:
        for d in walk(cfg):
            if isinstance(d.get("local"), dict) and "filename" in d["local"]:
                d["local"]["filename"] = str(wasm)
    return cfg


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ns(pid: int) -> int:
    """Nanoseconds of CPU all of the process's threads ran (the scheduler's count: clock ticks
    are too coarse for a few seconds of an idle Envoy)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(rest.split()[0])
    return out


def one(envoy: str, wasm: Path | None, concurrency: int, settle: float, tmp: Path) -> dict:
    admin, listener = free_port(), free_port()
    path = tmp / f"footprint-{os.getpid()}-{admin}.yaml"
    path.write_text(yaml.safe_dump(render(wasm, admin, listener), sort_keys=False))
    started = time.monotonic()
    proc = subprocess.Popen(
        [envoy, "-c", str(path), "--concurrency", str(concurrency), "--disable-hot-restart", "-l", "error"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready_wall = ready_cpu = None
        while time.monotonic() - started < 60:
            if proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {proc.returncode} ({wasm})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        ready_wall, ready_cpu = time.monotonic() - started, cpu_seconds(proc.pid)
                        break
            except OSError:
                time.sleep(0.01)
        if ready_wall is None:
            raise RuntimeError(f"envoy not ready in 60 s ({wasm})")
        time.sleep(settle / 2)
        # Idle CPU over the second half of the settle (timers, the filter's tick).
        idle0, idle_t0 = cpu_ns(proc.pid), time.monotonic()
        time.sleep(settle / 2)
        idle_ms_per_s = (cpu_ns(proc.pid) - idle0) / 1e6 / (time.monotonic() - idle_t0)
        mem = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/memory", timeout=5))
        st = status_kib(proc.pid)
        return {
            "ready_s": ready_wall,
            "ready_cpu_s": ready_cpu,
            "rss_mib": st.get("VmRSS", 0) / 1024,
            "peak_mib": st.get("VmHWM", 0) / 1024,
            "allocated_mib": int(mem["allocated"]) / 2**20,
            "heap_mib": int(mem["heap_size"]) / 2**20,
            "idle_cpu_ms_s": idle_ms_per_s,
        }
    finally:
        stop(proc)
        path.unlink(missing_ok=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def report(lines: list[str], heading: str, append: Path | None) -> None:
    """Prints a table, and appends it under `heading` to a report file when asked."""
    table = "\n".join(lines) + "\n"
    print(table)
    if append:
        with append.open("a") as f:
            f.write(f"\n## {heading}\n\n" + table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--settle", type=float, default=3.0, help="idle seconds before memory is read")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=WASM", help="another build")
    ap.add_argument("--append", type=Path, help="also append the table to this file (BENCHMARKS.md)")
    args = ap.parse_args()
    envoy = str(ROOT / ".venv" / "bin" / "envoy")
    builds: list[tuple[str, Path | None]] = [("plain Envoy", None), ("no-op filter", NOOP_WASM),
                                              ("llm-failover", FILTER_WASM)]
    for spec in args.extra:
        name, _, path = spec.partition("=")
        builds.append((name, Path(path)))
    for name, wasm in builds:
        if wasm is not None and not wasm.exists():
            raise SystemExit(f"footprint: {wasm} missing (make build; bench/run.py builds the no-op filter)")
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as t:
        for r in range(args.rounds):
            for c in levels:
                for name, wasm in builds:
                    results.setdefault((name, c), []).append(one(envoy, wasm, c, args.settle, Path(t)))
            print(f"footprint: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(x[key] for x in results[(name, c)])

    lines = [
        f"Medians of {args.rounds} rounds, `envoy/local.yaml`, idle {args.settle:g} s after `/ready`.",
        "",
        "| build | `--concurrency` | start to `/ready`: Envoy CPU | wall | idle RSS | peak RSS | allocated | allocator heap | idle CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _ in builds:
        for c in levels:
            lines.append(
                f"| {name} | {c} | {med(name, c, 'ready_cpu_s'):.2f} s | {med(name, c, 'ready_s'):.2f} s "
                f"| {med(name, c, 'rss_mib'):.1f} MiB | {med(name, c, 'peak_mib'):.1f} MiB "
                f"| {med(name, c, 'allocated_mib'):.1f} MiB | {med(name, c, 'heap_mib'):.0f} MiB "
                f"| {med(name, c, 'idle_cpu_ms_s'):.1f} ms/s |")
    lines.append("")
    for name, _ in builds[2:]:
        for c in levels:
            lines.append(
                f"* {name}, `--concurrency {c}`: idle RSS {med(name, c, 'rss_mib') - med('no-op filter', c, 'rss_mib'):+.1f} MiB, "
                f"start-up CPU {med(name, c, 'ready_cpu_s') - med('no-op filter', c, 'ready_cpu_s'):+.2f} s over the no-op filter")
    report(lines, "Footprint: start-up and idle memory (bench/footprint.py)", args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
