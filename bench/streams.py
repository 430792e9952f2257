#!/usr/bin/env python3
"""The workload LLM gateways carry: long SSE streams of small chunks, many open at once.

Variants on `envoy/local.yaml` (one Envoy worker): plain Envoy (its Wasm filters removed), the
no-op Wasm filter on llm-failover's layout, and llm-failover with and without
`stream_options.include_usage`. The no-op filter takes the module's place everywhere the shipped
config loads it (the HTTP filter and the upstream filter of the streamed path), and its streams
name the cluster that llm-failover sends a healthy stream to, read from Envoy's access log of one
such stream: so both run the same Envoy path (route, clusters, upstream filter) whatever the
shipped wiring is, and the ratio between them is the filter's own work. Its variant with the
router's retries also names llm-failover's list of attempt clusters (the wiring's priority
groups): Envoy's own price of a stream that can fail over. (Envoy's Lua filter is not among them: the Lua failover of
`bench/lua` answers from an `httpCall`, which buffers a stream whole, so it has no per-chunk
path to compare.) The upstream is an asyncio server of this script that answers
every request with `--chunks` chat chunks of about 220 bytes, `--gap-ms` apart, ending in
`data: [DONE]` (with a usage chunk when the request asked for it); its CPU is reported so that it
is seen not to be the bottleneck. Measured, per variant, rounds interleaved:

* Envoy CPU per chunk and per stream, with `--streams` streams open at once (against the no-op
  filter: the median of each round's own ratio, as a round's variants run back to back);
* time to the first chunk at one connection (median of `--ttfc` sequential requests);
* memory per open stream: Envoy's RSS with `--open` streams held open (their first chunk read),
  minus its RSS before, divided by `--open`.

Loopback only; every loop is bounded by counts and by time.

    .venv/bin/python bench/streams.py [--rounds 5] [--append BENCHMARKS.md] [--extra NAME=x.wasm]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import footprint  # noqa: E402  (render, cpu_ns, status_kib, the wasm paths)

ROOT = footprint.ROOT
CHUNK_TEXT = "lorem ipsum dolor sit amet "  # content of each chunk's delta


# ---- upstream: an asyncio SSE server in a process of its own ----------------------------------

def chunk(i: int) -> bytes:
    body = {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1733222400,
        "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": {"content": CHUNK_TEXT}, "logprobs": None, "finish_reason": None}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def usage_chunk() -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1733222400,
            "model": "gpt-4o-2024-08-06", "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 300, "total_tokens": 309}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def hexlen(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunks: int, gap: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            usage = b"include_usage" in body
            try:
                count = int(json.loads(body).get("max_tokens") or chunks)
            except (ValueError, AttributeError):
                count = chunks
            if b'"hold"' in body:
                # A stream held open: its first chunk, then nothing for up to 20 s.
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                             b"transfer-encoding: chunked\r\n\r\n" + hexlen(chunk(0)))
                await writer.drain()
                await asyncio.sleep(20)
                writer.write(hexlen(b"data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                         b"transfer-encoding: chunked\r\nx-request-id: bench\r\n\r\n")
            for i in range(count):
                writer.write(hexlen(chunk(i)))
                await writer.drain()
                if gap:
                    await asyncio.sleep(gap)
            if usage:
                writer.write(hexlen(usage_chunk()))
            writer.write(hexlen(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def upstream_main(port: int, chunks: int, gap_ms: float) -> None:
    async def run() -> None:
        server = await asyncio.start_server(lambda r, w: serve_one(r, w, chunks, gap_ms / 1000),
                                            "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()
    asyncio.run(run())


# ---- client ------------------------------------------------------------------------------------

def request_bytes(port: int, include_usage: bool, hold: bool = False, chunks: int | None = None,
                  cluster: str = "openai", extra: str = "") -> bytes:
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "Tell me a story."}]}
    if chunks is not None:
        body["max_tokens"] = chunks  # the upstream sends this many chunks
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if hold:
        body["user"] = "hold"
    data = json.dumps(body).encode()
    # The cluster header lets plain Envoy and the no-op filter route like the filter does (the
    # filter overwrites it; the route removes it).
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"x-llm-failover-cluster: {cluster}\r\n{extra}content-length: {len(data)}\r\n\r\n").encode() + data


async def held_stream(port: int, req: bytes, first: asyncio.Event, release: asyncio.Event) -> None:
    """A stream whose first chunk is read, then held open until `release`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(req)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"\n\n")
        first.set()
        await release.wait()
    finally:
        writer.close()


async def one_stream(port: int, req: bytes) -> tuple[int, float]:
    """Sends one streamed request; returns (SSE data events read, seconds to the first one)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(req)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream answered {head.splitlines()[0]!r}")
    events, ttfc, buf = 0, None, b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.strip().split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        data = await reader.readexactly(size + 2)
        buf += data[:-2]
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event.startswith(b"data: "):
                events += 1
                if ttfc is None:
                    ttfc = time.monotonic() - started
    writer.close()
    return events, ttfc or 0.0


# ---- Envoy -------------------------------------------------------------------------------------

def plugin_targets(cfg: dict) -> list[dict]:
    """The targets of the filter's plugin JSON in an Envoy config."""
    plugin = next(json.loads(d["value"]) for d in footprint.walk(cfg)
                  if isinstance(d.get("value"), str) and '"targets"' in d["value"])
    return plugin["targets"]


def attempt_clusters(cfg: dict) -> str:
    """The cluster list llm-failover names for a streamed request of `cfg`'s chain (one entry per
    attempt: each target's cluster, its `retries` + 1 times), which the wiring's Lua filter turns
    into the route's priority groups."""
    return ",".join(t["cluster"] for t in plugin_targets(cfg) for _ in range(int(t.get("retries", 0)) + 1))


def with_router_retries(cfg: dict) -> None:
    """Gives the route the retries llm-failover asks of the router for a streamed request (its
    `x-envoy-*` headers, which Envoy does not take from a client): an attempt per try of every
    target of the plugin JSON, on a reset, a connect failure or a failure status. With retries
    on, the router keeps the request for them: Envoy's own price of a streamed failover."""
    plugin = next(json.loads(d["value"]) for d in footprint.walk(cfg)
                  if isinstance(d.get("value"), str) and '"targets"' in d["value"])
    tries = sum(int(t.get("retries", 0)) + 1 for t in plugin["targets"])
    codes = plugin.get("strategy", {}).get("on_status_codes") or [429, *range(500, 600)]
    for d in footprint.walk(cfg):
        if isinstance(d.get("retry_policy"), dict):
            d["retry_policy"].update({"num_retries": tries - 1, "retriable_status_codes": codes,
                                      "retry_on": "reset,connect-failure,retriable-status-codes"})


def start_envoy(wasm: Path | None, upstream: int, tmp: Path, cluster_log: Path | None = None,
                retries: bool = False) -> tuple[subprocess.Popen, int, int]:
    """Envoy on `envoy/local.yaml` with `wasm` in the filter's places (`None`: plain Envoy), every
    cluster pointed at the upstream; `cluster_log` gets the upstream cluster of every request;
    `retries`: the route has the retries llm-failover asks for a streamed request."""
    admin, listener = footprint.free_port(), footprint.free_port()
    cfg = footprint.render(wasm, admin, listener)
    if retries:
        with_router_retries(cfg)
    if cluster_log is not None:
        for d in footprint.walk(cfg):
            if d.get("stat_prefix") and isinstance(d.get("access_log"), list):
                d["access_log"].append({"name": "envoy.access_loggers.file", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(cluster_log),
                    "log_format": {"text_format_source": {"inline_string": "%UPSTREAM_CLUSTER%\n"}}}})
    for d in footprint.walk(cfg):
        sa = d.get("socket_address")
        if isinstance(sa, dict) and sa.get("port_value") not in (admin, listener):
            sa["port_value"] = upstream
    for lst in cfg["static_resources"]["listeners"]:
        lst["per_connection_buffer_limit_bytes"] = lst.get("per_connection_buffer_limit_bytes", 4194304)
    path = tmp / f"streams-{admin}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "envoy"), "-c", str(path), "--concurrency", "1",
                             "--disable-hot-restart", "-l", "error"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1):
                return proc, listener, admin
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("envoy not ready")


def allocated(admin: int) -> int:
    """Bytes Envoy's allocator has handed out (Wasm linear memory is not among them)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/memory", timeout=5) as r:
        return int(json.load(r)["allocated"])


async def measure(envoy: subprocess.Popen, listener: int, admin: int, upstream_pid: int, args,
                  include_usage: bool, cluster: str) -> dict:
    req = request_bytes(listener, include_usage, cluster=cluster)
    short = request_bytes(listener, include_usage, chunks=3, cluster=cluster)
    # Warm-up: the first request down a path pays V8's compilation (docs/performance.md).
    for _ in range(5):
        await one_stream(listener, short)
    # Time to the first chunk at one connection (short streams: the first chunk is what counts).
    ttfc = [(await one_stream(listener, short))[1] for _ in range(args.ttfc)]
    # CPU per chunk and per stream.
    cpu0, up0 = footprint.cpu_ns(envoy.pid), footprint.cpu_ns(upstream_pid)
    wall0 = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*(one_stream(listener, req) for _ in range(args.streams))),
                                     timeout=120)
    wall = time.monotonic() - wall0
    cpu, up = (footprint.cpu_ns(envoy.pid) - cpu0) / 1e9, (footprint.cpu_ns(upstream_pid) - up0) / 1e9
    events = sum(e for e, _ in results)
    # Memory per open stream.
    held = request_bytes(listener, include_usage, hold=True, cluster=cluster)
    rss0, alloc0 = footprint.status_kib(envoy.pid).get("VmRSS", 0), allocated(admin)
    release = asyncio.Event()
    firsts = [asyncio.Event() for _ in range(args.open)]
    tasks = [asyncio.create_task(held_stream(listener, held, f, release)) for f in firsts]
    try:
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), timeout=15)
        rss1, alloc1 = footprint.status_kib(envoy.pid).get("VmRSS", 0), allocated(admin)
    finally:
        release.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
    return {
        "per_chunk_us": cpu / max(events, 1) * 1e6,
        "per_stream_us": cpu / args.streams * 1e6,
        "ttfc_us": statistics.median(ttfc) * 1e6,
        "per_open_kib": (rss1 - rss0) / args.open,
        "per_open_alloc_kib": (alloc1 - alloc0) / 1024 / args.open,
        "envoy_core": cpu / wall,
        "upstream_core": up / wall,
        "events": events / args.streams,
    }


def streamed_cluster(upstream: int, tmp: Path) -> str:
    """The cluster llm-failover routes a healthy streamed request to, in the shipped wiring: read
    from Envoy's access log of one such request, so that the no-op filter's streams take the same
    path through Envoy (clusters, route, the router's upstream filter) whatever that wiring is."""
    log = tmp / "clusters.log"
    envoy, listener, _ = start_envoy(footprint.FILTER_WASM, upstream, tmp, cluster_log=log)
    try:
        events, _ = asyncio.run(asyncio.wait_for(
            one_stream(listener, request_bytes(listener, False, chunks=1)), timeout=30))
    finally:
        footprint.stop(envoy)
    names = log.read_text().split() if log.exists() else []
    if events < 1 or len(names) != 1 or names[0] == "-":
        raise RuntimeError(f"streams: no upstream cluster logged for llm-failover's stream ({names})")
    return names[0]


# (name, Wasm, include_usage, the cluster the client names: None is llm-failover's streamed one)
VARIANTS = [
    ("plain Envoy", None, False, "openai"),
    ("no-op filter, llm-failover's layout", footprint.NOOP_WASM, False, None),
    ("the same, with the router's retries", footprint.NOOP_WASM, False, None),
    ("llm-failover", footprint.FILTER_WASM, False, "openai"),
    ("llm-failover, `include_usage`", footprint.FILTER_WASM, True, "openai"),
]
LAYOUT = "no-op filter, llm-failover's layout"
RETRIED = "the same, with the router's retries"
# The RETRIED variant's cluster header: the plan's list (so the wiring builds the same priority
# groups as for llm-failover's streams), read from the shipped config.
WIRED = attempt_clusters(footprint.render(footprint.NOOP_WASM, 1, 2))


# The goals of issue 30 for the streams, same run: per chunk against the no-op filter on
# llm-failover's layout, time to first chunk over it, memory per open stream over plain Envoy.
GOAL_PER_CHUNK = 1.05
GOAL_TTFC_US = 100.0
GOAL_OPEN_KIB = 8.0


def table(results: dict[str, list[dict]], args, streamed: str) -> list[str]:
    """The report: medians of the rounds per variant; against the no-op filter, the median (and
    the range) of each round's own ratio or difference, as the variants of a round ran one after
    the other: a shared machine's drift between rounds cancels out."""
    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    def paired(name: str, key: str, base: str, ratio: bool) -> tuple[float, float, float]:
        pairs = [(x[key] / b[key]) if ratio else (x[key] - b[key]) for x, b in zip(results[name], results[base])]
        return statistics.median(pairs), min(pairs), max(pairs)

    lines = [
        f"{args.chunks} chunks of about 220 B per stream, {args.gap_ms:g} ms apart; one Envoy worker; medians of "
        f"{args.rounds} rounds (\"vs no-op filter\": the median of each round's own ratio, its range in brackets). "
        f"CPU with {args.streams} streams at once, time to first chunk at one connection (median of {args.ttfc}), "
        f"memory with {args.open} streams open. The no-op filter runs on llm-failover's layout: in both of "
        f"its places (the HTTP filter and the router's upstream filter), its streams sent to the cluster "
        f"llm-failover sends a healthy stream to (`{streamed}`, read from Envoy's access log); \"with the "
        f"router's retries\": the route also has the retries llm-failover asks of the router for a streamed "
        f"request, and its streams name llm-failover's list of attempt clusters (`{WIRED}`), which the "
        f"wiring turns into priority groups: Envoy's own price of streamed failover (with retries on, the "
        f"router keeps the request for them).",
        "",
        "| variant | Envoy CPU per chunk | vs no-op filter | vs plain Envoy | per stream | time to first chunk "
        "| memory per open stream: Envoy's allocator | RSS | Envoy / upstream CPU (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _, _, _ in VARIANTS:
        ratio, low, high = paired(name, "per_chunk_us", LAYOUT, ratio=True)
        plain, _, _ = paired(name, "per_chunk_us", "plain Envoy", ratio=True)
        lines.append(
            f"| {name} | {med(name, 'per_chunk_us'):.2f} us | {ratio:.2f}x [{low:.2f}-{high:.2f}] "
            f"| {plain:.2f}x | {med(name, 'per_stream_us'):.0f} us "
            f"| {med(name, 'ttfc_us'):.0f} us | {med(name, 'per_open_alloc_kib'):.1f} KiB "
            f"| {med(name, 'per_open_kib'):.1f} KiB | {med(name, 'envoy_core'):.2f} / {med(name, 'upstream_core'):.2f} |")
    lines.append("")
    floor = med(RETRIED, "per_open_alloc_kib") - med("plain Envoy", "per_open_alloc_kib")
    for name, _, usage, _ in VARIANTS[3:]:
        ratio, low, high = paired(name, "per_chunk_us", LAYOUT, ratio=True)
        ttfc, t_low, t_high = paired(name, "ttfc_us", LAYOUT, ratio=False)
        kib = med(name, "per_open_alloc_kib") - med("plain Envoy", "per_open_alloc_kib")
        lines.append(
            f"* {name}: per chunk {ratio:.2f}x the no-op filter [{low:.2f}-{high:.2f}] (goal <= {GOAL_PER_CHUNK:.2f}x: "
            f"{'met' if ratio <= GOAL_PER_CHUNK else '**NOT met**'}), time to first chunk {ttfc:+.0f} us over it "
            f"[{t_low:+.0f} to {t_high:+.0f}] (goal <= +{GOAL_TTFC_US:.0f} us: "
            f"{'met' if ttfc <= GOAL_TTFC_US else '**NOT met**'}), memory per open stream {kib:+.1f} KiB over plain "
            f"Envoy (goal <= +{GOAL_OPEN_KIB:.0f} KiB: {'met' if kib <= GOAL_OPEN_KIB else '**NOT met**'}; "
            f"the no-op filter with the router's retries, which keep the body's whole read slice, is at "
            f"{floor:+.1f} KiB); against that variant: time to first chunk "
            f"{paired(name, 'ttfc_us', RETRIED, ratio=False)[0]:+.0f} us, memory per open stream "
            f"{med(name, 'per_open_alloc_kib') - med(RETRIED, 'per_open_alloc_kib'):+.1f} KiB (llm-failover copies "
            f"a small body out of its read slice)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=50, help="streams open at once for the CPU figures")
    ap.add_argument("--ttfc", type=int, default=60, help="sequential requests for time to first chunk")
    ap.add_argument("--open", type=int, default=1000, help="streams held open for the memory figure")
    ap.add_argument("--append", type=Path)
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=WASM",
                    help="another build, run as the llm-failover variant (experiments)")
    args = ap.parse_args()
    for spec in args.extra:
        name, _, path = spec.partition("=")
        VARIANTS.append((name, Path(path), False, "openai"))
    for _, wasm, _, _ in VARIANTS:
        if wasm is not None and not wasm.exists():
            raise SystemExit(f"streams: {wasm} missing (make build; bench/run.py builds the no-op filter)")
    up_port = footprint.free_port()
    # The held-open streams must outlast the memory reading: a slow pace for them is the
    # upstream's normal one (chunks * gap), at least 3 s.
    upstream = subprocess.Popen([sys.executable, __file__, "--serve", str(up_port), str(args.chunks), str(args.gap_ms)])
    results: dict[str, list[dict]] = {}
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", up_port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        with tempfile.TemporaryDirectory() as t:
            streamed = streamed_cluster(up_port, Path(t))
            for r in range(args.rounds):
                for name, wasm, usage, cluster in VARIANTS:
                    envoy, listener, admin = start_envoy(wasm, up_port, Path(t), retries=name == RETRIED)
                    try:
                        named = WIRED if name == RETRIED else cluster or streamed
                        results.setdefault(name, []).append(asyncio.run(
                            measure(envoy, listener, admin, upstream.pid, args, usage, named)))
                    finally:
                        footprint.stop(envoy)
                print(f"streams: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        footprint.stop(upstream)

    lines = table(results, args, streamed)
    footprint.report(lines, "Streams: the LLM-shaped workload (bench/streams.py)", args.append)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        upstream_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit(main())
