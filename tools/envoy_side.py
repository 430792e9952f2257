#!/usr/bin/env python3
"""The Envoy side of streamed failover, written from the filter's own configuration.

A `"stream": true` request that can fail over goes through Envoy's router, which retries it on
the next target before the first response byte (docs/failure-semantics.md, "Streamed requests").
The router walks an aggregate cluster per plan the filter may hand it; this tool writes those
clusters from the plugin configuration of the Envoy config's llm_failover filter, so the chain
has one source of truth:

* member clusters `llm_failover.try.<target>.<n>`: try n of a target, a copy of the target's own
  cluster (address, TLS, DNS, HTTP version, timeouts) whose endpoints carry
  `filter_metadata.llm_failover.target` (the upstream filter reads which target it addresses);
* aggregate clusters `llm_failover.stream.<target>.<tries>...`: a plan's members in order, with
  the llm_failover upstream filter (`{"role": "upstream"}`, the filter's own vm_config, so the
  same Wasm VM) and a retry circuit breaker that does not turn failover off under load.

The plans are the filter's own (`cargo run --bin envoy-side`, src/streamed.rs): every part of a
chain (top-level or a route's) that keeps its order and can fail over, at most 4 targets long.
The route that carries the filter's requests needs the retry policy of envoy/local.yaml
(`num_retries: 0`, `previous_priorities`, a 1 ms back-off); the filter enables the retries per
streamed request.

    python tools/envoy_side.py ENVOY.yaml            print the config with its streamed-failover
                                                     clusters written (generated ones replaced)
    python tools/envoy_side.py ENVOY.yaml --write    rewrite, in place, the block between the
                                                     "# >>> streamed failover" and "# <<<" lines
    python tools/envoy_side.py ENVOY.yaml --check    exit 1 when the config's streamed-failover
                                                     side disagrees with its plugin config
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
GENERATED_PREFIX = "llm_failover."
UPSTREAM_CONFIG = '{"role": "upstream"}'
BEGIN = "# >>> streamed failover"
END = "# <<< streamed failover"
BLOCK_NOTE = ["generated from the plugin configuration above: do not edit, run",
              "`python tools/envoy_side.py <this file> --write` (`make validate` checks it)."]
MAX_CONCURRENT_RETRIES = 100000
METADATA_NAMESPACE = "llm_failover"


class Dumper(yaml.SafeDumper):
    """YAML as a person would write it: block scalars for multi-line strings, and readable
    anchors for the objects every aggregate shares."""

    def generate_anchor(self, node):
        keys = [k.value for k, _ in node.value] if isinstance(node, yaml.MappingNode) else []
        if PROTOCOL_OPTIONS in keys:
            return "llm_failover_upstream"
        if "thresholds" in keys:
            return "llm_failover_retries"
        return super().generate_anchor(node)


def _str_representer(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, _str_representer)


def dump(obj) -> str:
    return yaml.dump(obj, Dumper=Dumper, sort_keys=False, width=120)


@functools.lru_cache(maxsize=None)
def _binary() -> str:
    subprocess.run(["cargo", "build", "--quiet", "--bin", "envoy-side"], cwd=ROOT, check=True)
    return str(ROOT / "target" / "debug" / "envoy-side")


class InvalidPlugin(SystemExit):
    """The plugin configuration is refused (the filter would refuse it too)."""


@functools.lru_cache(maxsize=256)
def plans(plugin_json: str) -> dict:
    """The members and aggregates of a plugin configuration (src/streamed.rs, `envoy_side`)."""
    out = subprocess.run([_binary(), "-"], input=plugin_json, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise InvalidPlugin(out.stderr.strip() or f"envoy-side exited {out.returncode}")
    return json.loads(out.stdout)


def listener_filters(cfg: dict) -> list[dict]:
    """The llm_failover filters (their Wasm `config`) of the config's listeners."""
    found = []
    for lst in (cfg.get("static_resources") or {}).get("listeners") or []:
        for chain in lst.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                for hf in (f.get("typed_config") or {}).get("http_filters") or []:
                    tc = hf.get("typed_config") or {}
                    if tc.get("@type") == WASM_FILTER:
                        found.append(tc["config"])
    return found


def is_generated(cluster: dict) -> bool:
    return str(cluster.get("name", "")).startswith(GENERATED_PREFIX)


def generated_clusters(cfg: dict) -> list[dict]:
    """The streamed-failover clusters the config's filter needs (empty without one)."""
    filters = listener_filters(cfg)
    if not filters:
        return []
    if len(filters) > 1:
        raise SystemExit("more than one llm_failover filter: write their streamed-failover clusters one at a time")
    [wasm] = filters
    side = plans(wasm["configuration"]["value"])
    if not side["aggregates"]:
        return []
    clusters = {c["name"]: c for c in (cfg.get("static_resources") or {}).get("clusters") or []
                if not is_generated(c)}
    out = []
    for m in side["members"]:
        source = clusters.get(m["cluster"])
        if source is None:
            raise SystemExit(f"target {m['target']}: cluster {m['cluster']!r} is not in the Envoy config")
        out.append(member(source, m))
    upstream = {
        "name": "llm_failover.upstream",
        "typed_config": {"@type": WASM_FILTER, "config": {
            "name": "llm_failover.upstream",
            "root_id": wasm.get("root_id", ""),
            "failure_policy": wasm.get("failure_policy", "FAIL_RELOAD"),
            # Its request headers are held while the attempt's body is rewritten.
            "allow_on_headers_stop_iteration": True,
            # The filter's own VM: the upstream filter works from the filter's configuration.
            "vm_config": copy.deepcopy(wasm["vm_config"]),
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": UPSTREAM_CONFIG},
        }},
    }
    options = {PROTOCOL_OPTIONS: {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        # The members' own protocol options are the ones their connections use.
        "explicit_http_config": {"http_protocol_options": {}},
        "http_filters": [upstream, {"name": "envoy.filters.http.upstream_codec", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}],
    }}
    # Envoy allows 3 retries in flight per cluster by default: failover would stop under load.
    retries = {"thresholds": [{"priority": "DEFAULT", "max_retries": MAX_CONCURRENT_RETRIES}]}
    for a in side["aggregates"]:
        out.append({
            "name": a["name"],
            "connect_timeout": "5s",
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": a["members"]}},
            "circuit_breakers": retries,
            "typed_extension_protocol_options": options,
        })
        # Its marker: no endpoints, no filters. The filter asks Envoy whether it has the marker
        # before routing to the aggregate; without it a healthy stream is routed to its target.
        out.append({"name": a["ready"], "type": "STATIC", "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": a["ready"], "endpoints": []}})
    return out


def member(source: dict, m: dict) -> dict:
    """Try `m["try"]` of a target: its cluster under another name, the target in the endpoints'
    metadata, no upstream filters of its own."""
    c = copy.deepcopy(source)
    c["name"] = m["name"]
    la = c.get("load_assignment")
    if not la:
        raise SystemExit(f"cluster {source['name']!r}: a member needs its endpoints in load_assignment")
    la["cluster_name"] = m["name"]
    for group in la.get("endpoints") or []:
        for lb in group.get("lb_endpoints") or []:
            md = lb.setdefault("metadata", {}).setdefault("filter_metadata", {})
            md[METADATA_NAMESPACE] = {"target": m["target"], "try": m["try"]}
    for opts in (c.get("typed_extension_protocol_options") or {}).values():
        opts.pop("http_filters", None)
    return c


def apply(cfg: dict, strict: bool = True) -> dict:
    """`cfg` with its generated clusters replaced by what its plugin config needs now (with
    `strict=False`, a plugin config the filter would refuse gets none)."""
    sr = cfg.setdefault("static_resources", {})
    kept = [c for c in sr.get("clusters") or [] if not is_generated(c)]
    try:
        generated = generated_clusters({**cfg, "static_resources": {**sr, "clusters": kept}})
    except InvalidPlugin:
        if strict:
            raise
        generated = []
    sr["clusters"] = kept + generated
    return cfg


def differences(cfg: dict) -> list[str]:
    """How the config's generated clusters differ from what its plugin config needs."""
    have = {c["name"]: c for c in (cfg.get("static_resources") or {}).get("clusters") or [] if is_generated(c)}
    want = {c["name"]: c for c in generated_clusters(cfg)}
    # Compare as JSON: anchors and key order do not matter.
    norm = lambda c: json.loads(json.dumps(c, sort_keys=True))  # noqa: E731
    out = [f"missing cluster {n}" for n in want if n not in have]
    out += [f"cluster {n} is not needed by the plugin config" for n in have if n not in want]
    out += [f"cluster {n} differs from what the plugin config needs" for n in want
            if n in have and norm(have[n]) != norm(want[n])]
    return out + route_problems(cfg, bool(want))


def route_problems(cfg: dict, needed: bool) -> list[str]:
    """The route carrying the filter's requests must let the filter enable retries that move on."""
    if not needed:
        return []
    out = []
    for lst in (cfg.get("static_resources") or {}).get("listeners") or []:
        for chain in lst.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                hcm = f.get("typed_config") or {}
                for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or []:
                    for r in vh.get("routes") or []:
                        action = r.get("route") or {}
                        if action.get("cluster_header") != "x-llm-failover-cluster":
                            continue
                        policy = action.get("retry_policy") or {}
                        prio = (policy.get("retry_priority") or {}).get("name")
                        if prio != "envoy.retry_priorities.previous_priorities":
                            out.append(f"route of virtual host {vh.get('name')!r}: retry_policy.retry_priority "
                                       "must be envoy.retry_priorities.previous_priorities")
                        if policy.get("retry_on") or int(policy.get("num_retries", 1)) != 0:
                            out.append(f"route of virtual host {vh.get('name')!r}: retry_policy must not retry "
                                       "by itself (num_retries: 0, no retry_on): the filter enables retries per "
                                       "streamed request")
    return out


_BLOCK = re.compile(r"^(?P<indent>[ \t]*)" + re.escape(BEGIN) + r".*?\n(?P<body>.*?)^[ \t]*" + re.escape(END)
                    + r"[^\n]*\n", re.S | re.M)


def write_block(text: str) -> str:
    """An Envoy config's text with the block between the markers rewritten."""
    return write_block_with(text, generated_clusters(yaml.safe_load(text)))


def write_block_with(text: str, items: list, note: list[str] = BLOCK_NOTE) -> str:
    """`text` with the list items between the markers replaced by `items`."""
    m = _BLOCK.search(text)
    if not m:
        raise SystemExit(f"no '{BEGIN}' ... '{END}' block in the file: add the two comment lines at the end of "
                         "the list the generated items go in")
    indent = m.group("indent")
    note = "".join(f"{indent}# {line}\n" for line in note)
    if items:
        body = "".join((indent + line) if line.strip() else "\n" for line in dump(items).splitlines(True))
    else:
        body = f"{indent}# (none: the plugin configuration needs no streamed-failover clusters)\n"
    block = f"{indent}{BEGIN}: clusters\n{note}" + body + f"{indent}{END}\n"
    return text[:m.start()] + block + text[m.end():]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the marked block of the file in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when the streamed-failover side disagrees")
    args = p.parse_args(argv)
    text = args.config.read_text()
    if args.check:
        problems = differences(yaml.safe_load(text))
        for line in problems:
            print(f"{args.config}: {line}")
        return 1 if problems else 0
    if args.write:
        new = write_block(text)
        if new != text:
            args.config.write_text(new)
            print(f"wrote {args.config}")
        return 0
    sys.stdout.write(dump(apply(yaml.safe_load(text))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
