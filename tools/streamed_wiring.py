#!/usr/bin/env python3
"""Streamed failover's Envoy wiring: what an Envoy config needs for its llm_failover filters, and
what is missing from it.

A `"stream": true` request that can fail over goes through Envoy's router, which retries it on
the next target's own cluster before the first response byte (docs/failure-semantics.md,
"Streamed requests"; docs/envoy-notes.md has the measurements). The filter names the cluster of
each attempt of the request in `x-llm-failover-cluster` (`openai,openai,azure`); a person writes,
once, next to each llm_failover filter (README, "Streamed failover"):

* after the filter, a Lua filter that turns that list into the dynamic metadata
  `llm_failover.priority_groups` and clears the route cache (a Wasm filter cannot write dynamic
  metadata);
* on each route of the filter's requests, the `priority_group` cluster specifier reading that
  metadata, and a retry policy with `refresh_cluster_on_retry: true` that does not retry by
  itself (`num_retries: 0`, no `retry_on`: the filter enables retries per streamed request);
* in the router's `upstream_http_filters`, the llm_failover upstream filter (the same module and
  `vm_config`, `{"role": "upstream"}`, then `upstream_codec`): it addresses each attempt of a
  streamed request for its target. Not on the clusters: the filter's callouts to a cluster run
  that cluster's upstream filters inside the filter's own callback, which the Rust SDK refuses
  (a reentrant context creation panics), and a cluster's upstream filters replace the router's;
* on every target's cluster (`targets[].cluster`), a retry circuit breaker that does not turn
  failover off under load.

Nothing is generated: there is no cluster per plan, and a new target needs only its own cluster.

    python tools/streamed_wiring.py ENVOY.yaml     exit 1, naming each missing piece, when the
                                                   config's streamed side is incomplete
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
LUA_FILTER = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
PRIORITY_GROUP = "envoy.router.cluster_specifier_plugin.priority_group"
UPSTREAM_CODEC = "envoy.filters.http.upstream_codec"
CLUSTER_HEADER = "x-llm-failover-cluster"
METADATA_NAMESPACE = "llm_failover"
# Envoy allows 3 retries in flight per cluster by default: failover would stop under load.
MIN_CONCURRENT_RETRIES = 1000
# What the Lua filter must do (README's snippet does all of it).
LUA_NEEDS = (CLUSTER_HEADER, f'"{METADATA_NAMESPACE}"', '"priority_groups"', "cluster_name", "clearRouteCache")


class Dumper(yaml.SafeDumper):
    """YAML as a person would write it: block scalars for multi-line strings, and readable
    anchors for the objects the filters and target clusters share."""

    def generate_anchor(self, node):
        keys = [k.value for k, _ in node.value] if isinstance(node, yaml.MappingNode) else []
        if "thresholds" in keys:
            return "llm_failover_retries"
        if "vm_id" in keys:
            return "llm_failover_vm"
        return super().generate_anchor(node)


def _str_representer(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, _str_representer)


def dump(obj) -> str:
    return yaml.dump(obj, Dumper=Dumper, sort_keys=False, width=120)


def _hcms(cfg: dict):
    """(listener name, HTTP connection manager config) of every listener."""
    for lst in (cfg.get("static_resources") or {}).get("listeners") or []:
        for chain in lst.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                tc = f.get("typed_config") or {}
                if "http_filters" in tc:
                    yield lst.get("name", "?"), tc


def listener_filters(cfg: dict) -> list[dict]:
    """The llm_failover filters (their Wasm `config`) of the config's listeners."""
    return [hf["typed_config"]["config"] for _, hcm in _hcms(cfg) for hf in hcm["http_filters"]
            if (hf.get("typed_config") or {}).get("@type") == WASM_FILTER]


def plugin(wasm: dict) -> dict:
    try:
        return json.loads(wasm["configuration"]["value"])
    except (KeyError, TypeError, ValueError):
        return {}


def streams_through_router(wasm: dict) -> bool:
    return ((plugin(wasm).get("streaming") or {}).get("failover") or "router") == "router"


def upstream_filter(http_filters: list) -> dict | None:
    """The llm_failover upstream filter (its Wasm `config`) among upstream HTTP filters."""
    for hf in http_filters or []:
        tc = hf.get("typed_config") or {}
        if tc.get("@type") == WASM_FILTER and plugin(tc.get("config") or {}).get("role") == "upstream":
            return tc["config"]
    return None


def routers(hcm: dict) -> list[dict]:
    """The router filters' typed_config of an HTTP connection manager."""
    return [hf["typed_config"] for hf in hcm["http_filters"] if (hf.get("typed_config") or {}).get("@type") == ROUTER]


def cluster_upstream_filters(cluster: dict) -> list:
    return ((cluster.get("typed_extension_protocol_options") or {}).get(PROTOCOL_OPTIONS) or {}).get("http_filters") or []


def _lua_source(hf: dict) -> str:
    tc = hf.get("typed_config") or {}
    src = tc.get("default_source_code") or tc.get("inline_code") or {}
    return src.get("inline_string", "") if isinstance(src, dict) else str(src)


def _matches_lists_only(route: dict) -> bool:
    return any(h.get("name") == CLUSTER_HEADER for h in (route.get("match") or {}).get("headers") or [])


def _route_problems(where: str, route: dict) -> list[str]:
    action = route.get("route")
    if action is None:
        return []
    out = []
    ext = ((action.get("inline_cluster_specifier_plugin") or {}).get("extension")) or {}
    spec = ext.get("typed_config") or {}
    if ext.get("name") != PRIORITY_GROUP:
        out.append(f"{where}: the route's cluster must come from inline_cluster_specifier_plugin "
                   f"{PRIORITY_GROUP} (it has {', '.join(k for k in action if 'cluster' in k) or 'none'})")
    elif spec.get("override_metadata_namespace") != METADATA_NAMESPACE:
        out.append(f"{where}: priority_group needs override_metadata_namespace: {METADATA_NAMESPACE}")
    policy = action.get("retry_policy") or {}
    if policy.get("refresh_cluster_on_retry") is not True:
        out.append(f"{where}: retry_policy.refresh_cluster_on_retry must be true (each retry chooses its "
                   "cluster again)")
    if policy.get("retry_on") or int(policy.get("num_retries", 1)) != 0:
        out.append(f"{where}: retry_policy must not retry by itself (num_retries: 0, no retry_on): the filter "
                   "enables retries per streamed request")
    if CLUSTER_HEADER not in (route.get("request_headers_to_remove") or []):
        out.append(f"{where}: request_headers_to_remove must hold {CLUSTER_HEADER}")
    return out


def problems(cfg: dict) -> list[str]:
    """What the config's streamed side lacks for each llm_failover filter that fails streams over
    through the router (empty when complete)."""
    out = []
    clusters = {c.get("name"): c for c in (cfg.get("static_resources") or {}).get("clusters") or []}
    for listener, hcm in _hcms(cfg):
        filters = hcm["http_filters"]
        kinds = [(hf.get("typed_config") or {}).get("@type") for hf in filters]
        for i, hf in enumerate(filters):
            if kinds[i] != WASM_FILTER:
                continue
            wasm = hf["typed_config"]["config"]
            if not streams_through_router(wasm):
                continue
            where = f"listener {listener}"
            end = next((j for j in range(i + 1, len(filters)) if kinds[j] == ROUTER), len(filters))
            lua = [[n for n in LUA_NEEDS if n not in _lua_source(filters[j])]
                   for j in range(i + 1, end) if kinds[j] == LUA_FILTER]
            if not lua:
                out.append(f"{where}: no Lua filter after the llm_failover filter (it turns {CLUSTER_HEADER} "
                           "into the route's priority groups: README, streamed failover)")
            elif all(lua):
                missing = min(lua, key=len)
                out.append(f"{where}: the Lua filter after the llm_failover filter does not use "
                           f"{', '.join(missing)} (README, streamed failover)")
            for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or []:
                routes = vh.get("routes") or []
                # A first route for the filter's lists alone (Istio's EnvoyFilter) leaves the others
                # to their own clusters; otherwise every route carries the filter's requests.
                if routes and _matches_lists_only(routes[0]):
                    routes = routes[:1]
                for n, route in enumerate(routes):
                    out += _route_problems(f"{where}, virtual host {vh.get('name')}, routes[{n}]", route)
            vm = wasm.get("vm_config") or {}
            for router in routers(hcm)[:1] or [{}]:
                ups = router.get("upstream_http_filters") or []
                up = upstream_filter(ups)
                if up is None:
                    out.append(f"{where}: the router has no llm_failover upstream filter (upstream_http_filters: the "
                               "module with {\"role\": \"upstream\"}, then envoy.filters.http.upstream_codec)")
                    continue
                if ups[-1].get("name") != UPSTREAM_CODEC:
                    out.append(f"{where}: the router's upstream_http_filters must end with {UPSTREAM_CODEC}")
                uvm = up.get("vm_config") or {}
                if (uvm.get("vm_id"), uvm.get("code")) != (vm.get("vm_id"), vm.get("code")):
                    out.append(f"{where}: the upstream filter's vm_config must be the filter's (same vm_id and code: "
                               "it works in the filter's VM)")
                if up.get("allow_on_headers_stop_iteration") is not True:
                    out.append(f"{where}: the upstream filter needs allow_on_headers_stop_iteration: true")
            for t in plugin(wasm).get("targets") or []:
                name = t.get("cluster")
                c = clusters.get(name)
                if c is None:
                    out.append(f"target {t.get('name')}: no cluster {name!r}")
                    continue
                if cluster_upstream_filters(c):
                    out.append(f"cluster {name}: upstream http_filters of its own replace the router's (the "
                               "llm_failover upstream filter) and run on the filter's callouts: move them to the router")
                thresholds = (c.get("circuit_breakers") or {}).get("thresholds") or []
                if not any(int(th.get("max_retries", 3)) >= MIN_CONCURRENT_RETRIES for th in thresholds):
                    out.append(f"cluster {name}: circuit_breakers.thresholds[].max_retries under "
                               f"{MIN_CONCURRENT_RETRIES} (Envoy's default, 3, turns failover off under load)")
    return list(dict.fromkeys(out))


def share_vm(cfg: dict) -> dict:
    """`cfg` with each router's llm_failover upstream filter on its listener filter's vm_config,
    so edits of the filter's VM (module path, environment) reach it."""
    for _, hcm in _hcms(cfg):
        wasm = [hf["typed_config"]["config"] for hf in hcm["http_filters"]
                if (hf.get("typed_config") or {}).get("@type") == WASM_FILTER]
        for router in routers(hcm):
            up = upstream_filter(router.get("upstream_http_filters"))
            if up is not None and wasm:
                up["vm_config"] = wasm[0]["vm_config"]
    return cfg


def drop_upstream_filter(cfg: dict) -> dict:
    """`cfg` with no llm_failover upstream filter (a config without the Wasm module)."""
    for _, hcm in _hcms(cfg):
        for router in routers(hcm):
            if upstream_filter(router.get("upstream_http_filters")) is not None:
                del router["upstream_http_filters"]
    return cfg


def strip(cfg: dict) -> dict:
    """`cfg` without a streamed side: no wiring Lua filter, no upstream filter, every route on
    `cluster_header: x-llm-failover-cluster` (the filter then fails streams over through callouts)."""
    drop_upstream_filter(cfg)
    for _, hcm in _hcms(cfg):
        hcm["http_filters"] = [hf for hf in hcm["http_filters"]
                               if not ((hf.get("typed_config") or {}).get("@type") == LUA_FILTER
                                       and '"priority_groups"' in _lua_source(hf))]
        for vh in (hcm.get("route_config") or {}).get("virtual_hosts") or []:
            for route in vh.get("routes") or []:
                action = route.get("route")
                if action and "inline_cluster_specifier_plugin" in action:
                    del action["inline_cluster_specifier_plugin"]
                    action["cluster_header"] = CLUSTER_HEADER
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    args = p.parse_args(argv)
    found = problems(yaml.safe_load(args.config.read_text()))
    for line in found:
        print(f"{args.config}: {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
