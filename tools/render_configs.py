#!/usr/bin/env python3
"""Configs derived from the hand-written ones, so that they cannot drift apart.

* envoy/compose.yaml <- envoy/local.yaml, for docker-compose.yml. Only the addresses differ: the
  listener and admin bind 0.0.0.0 inside the container (compose publishes them on the host's
  127.0.0.1 only) and each cluster reaches its compose service by name (STRICT_DNS) instead of
  127.0.0.1.
* deploy/kubernetes/envoy-config.yaml <- envoy/production.yaml, verbatim, as the ConfigMap of the
  Kubernetes sidecar.
* envoy/production-entra.yaml <- envoy/production.yaml with the Azure target on Entra ID tokens
  the filter fetches itself (client credentials; docs/deployment.md shows the managed-identity
  form) and the two token endpoints' clusters: login.microsoftonline.com over TLS (SNI, name
  check) and Azure IMDS (169.254.169.254, plain HTTP, as IMDS is).
* envoy/routes.yaml <- envoy/local.yaml with the plugin configuration of envoy/routes.json (the
  named route of BricksLLM's "OpenAI with Azure OpenAI as failover" guide), for
  `make run CONFIG=envoy/routes.yaml`.
* envoy/azure-first.yaml <- envoy/local.yaml with the plugin configuration of
  envoy/azure-first.json (Azure first, OpenAI when Azure fails; for apps written for Azure
  OpenAI), for `make run CONFIG=envoy/azure-first.yaml`.
* deploy/observability/llm-failover-prometheusrule.yaml <- deploy/observability/llm-failover-rules.yaml:
  the same rule groups, verbatim, as a PrometheusRule of the Prometheus Operator.

    python tools/render_configs.py           write the files
    python tools/render_configs.py --check   exit 1 when a file differs from what would be written
                                             (part of `make validate`)
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import sys
from pathlib import Path

import yaml

import streamed_wiring as wiring

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "envoy" / "local.yaml"
COMPOSE_ENVOY = ROOT / "envoy" / "compose.yaml"
PRODUCTION = ROOT / "envoy" / "production.yaml"
K8S_CONFIGMAP = ROOT / "deploy" / "kubernetes" / "envoy-config.yaml"
PRODUCTION_ENTRA = ROOT / "envoy" / "production-entra.yaml"
ROUTES_PLUGIN = ROOT / "envoy" / "routes.json"
ROUTES_ENVOY = ROOT / "envoy" / "routes.yaml"
AZURE_FIRST_PLUGIN = ROOT / "envoy" / "azure-first.json"
AZURE_FIRST_ENVOY = ROOT / "envoy" / "azure-first.yaml"
ALERT_RULES = ROOT / "deploy" / "observability" / "llm-failover-rules.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "observability" / "llm-failover-prometheusrule.yaml"

# envoy/local.yaml cluster -> docker-compose.yml service that serves it
COMPOSE_SERVICES = {"openai": "mock-openai", "azure": "mock-azure"}
K8S_CONFIGMAP_NAME = "llm-failover-envoy"


# Multi-line strings (the plugin JSON, the Lua filter) as YAML block scalars, and shared parts (the
# filter's vm_config, the clusters' retry circuit breaker) under readable anchors, as a person would
# write them.
_BlockStrDumper = wiring.Dumper


def _socket_address(address: dict) -> dict:
    return address["socket_address"]


def compose_envoy_config(local: dict) -> dict:
    """envoy/local.yaml as the compose stack runs it."""
    _socket_address(local["admin"]["address"])["address"] = "0.0.0.0"
    for listener in local["static_resources"]["listeners"]:
        _socket_address(listener["address"])["address"] = "0.0.0.0"
    for cluster in local["static_resources"]["clusters"]:
        name = cluster["name"]
        if name not in COMPOSE_SERVICES:
            raise SystemExit(f"envoy/local.yaml cluster {name!r} has no compose service: add it to "
                             f"docker-compose.yml and to COMPOSE_SERVICES in {Path(__file__).name}")
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_ONLY"
        for group in cluster["load_assignment"]["endpoints"]:
            for lb in group["lb_endpoints"]:
                _socket_address(lb["endpoint"]["address"])["address"] = COMPOSE_SERVICES[name]
    return local


def render_compose_envoy() -> str:
    cfg = compose_envoy_config(yaml.safe_load(LOCAL.read_text()))
    header = (
        "# GENERATED from envoy/local.yaml by tools/render_configs.py: do not edit, edit envoy/local.yaml and\n"
        "# run `python tools/render_configs.py`. `make validate` fails when this file is stale.\n"
        "# The local stack for docker-compose.yml: same as envoy/local.yaml except the addresses (listener\n"
        "# and admin on 0.0.0.0 in the container, published on the host's 127.0.0.1; clusters at the\n"
        "# compose services " + ", ".join(f"{s} ({c})" for c, s in COMPOSE_SERVICES.items()) + ").\n"
    )
    return header + yaml.dump(cfg, Dumper=_BlockStrDumper, sort_keys=False, width=120)


def render_k8s_configmap() -> str:
    body = "".join(("    " + line) if line.strip() else "\n" for line in PRODUCTION.read_text().splitlines(True))
    return (
        "# GENERATED from envoy/production.yaml by tools/render_configs.py: do not edit, edit\n"
        "# envoy/production.yaml and run `python tools/render_configs.py`. `make validate` fails when stale.\n"
        "# The Envoy sidecar's config (deployment.yaml mounts it at /etc/llm-failover/envoy/envoy.yaml).\n"
        "# Render the Azure resource name when applying:\n"
        "#   sed \"s/my-resource/$AZURE_OPENAI_RESOURCE/g\" deploy/kubernetes/envoy-config.yaml | kubectl apply -f -\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        f"  name: {K8S_CONFIGMAP_NAME}\n"
        "  labels:\n"
        "    app.kubernetes.io/name: llm-failover\n"
        "data:\n"
        "  envoy.yaml: |\n" + body
    )


def render_prometheusrule() -> str:
    text = ALERT_RULES.read_text()
    groups = text[text.index("\ngroups:") + 1:]
    body = "".join(("  " + line) if line.strip() else "\n" for line in groups.splitlines(True))
    return (
        "# GENERATED from deploy/observability/llm-failover-rules.yaml by tools/render_configs.py: do not\n"
        "# edit, edit the rules file and run `python tools/render_configs.py`. `make validate` fails when stale.\n"
        "# The alerting rules for the Prometheus Operator; its Prometheus picks them up when this object\n"
        "# matches its ruleSelector (the label below is an example: use your Prometheus' selector).\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: llm-failover\n"
        "  labels:\n"
        "    app.kubernetes.io/name: llm-failover\n"
        "    role: alert-rules\n"
        "spec:\n" + body
    )


def local_with_plugin(plugin_file: Path) -> dict:
    """envoy/local.yaml with the plugin configuration of `plugin_file` (its streamed-failover
    wiring is the same for every plugin configuration)."""
    cfg = yaml.safe_load(LOCAL.read_text())
    plugin = plugin_file.read_text()
    found = wiring.listener_filters(cfg)
    if len(found) != 1:
        raise SystemExit(f"envoy/local.yaml: expected one Wasm filter, found {len(found)}")
    found[0]["configuration"]["value"] = plugin
    return cfg


def render_routes_envoy() -> str:
    cfg = local_with_plugin(ROUTES_PLUGIN)
    header = (
        "# GENERATED from envoy/local.yaml and envoy/routes.json by tools/render_configs.py: do not edit,\n"
        "# edit those and run `python tools/render_configs.py`. `make validate` fails when stale.\n"
        "# The local stack with a named route: BricksLLM's \"OpenAI with Azure OpenAI as failover\" guide\n"
        "# (README.md, \"Coming from BricksLLM\"). `make run CONFIG=envoy/routes.yaml` starts it; then\n"
        "#   curl -X POST 127.0.0.1:10000/api/routes/test/chat/completion -H 'Authorization: Bearer my-secret-key' \\\n"
        "#        -H 'Content-Type: application/json' -d '{\"messages\": [{\"role\": \"system\", \"content\": \"hi\"}]}'\n"
    )
    return header + yaml.dump(cfg, Dumper=_BlockStrDumper, sort_keys=False, width=120)


def render_azure_first_envoy() -> str:
    cfg = local_with_plugin(AZURE_FIRST_PLUGIN)
    header = (
        "# GENERATED from envoy/local.yaml and envoy/azure-first.json by tools/render_configs.py: do not\n"
        "# edit, edit those and run `python tools/render_configs.py`. `make validate` fails when stale.\n"
        "# The local stack with Azure first and OpenAI as its fallback, for apps written for Azure OpenAI\n"
        "# (README.md, \"Apps written for Azure OpenAI\"). `make run CONFIG=envoy/azure-first.yaml` starts it; then\n"
        "#   curl '127.0.0.1:10000/openai/deployments/chat/chat/completions?api-version=2024-10-21' \\\n"
        "#        -H 'api-key: my-azure-app-key' -H 'Content-Type: application/json' \\\n"
        "#        -d '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'\n"
    )
    return header + yaml.dump(cfg, Dumper=_BlockStrDumper, sort_keys=False, width=120)


def render_production_entra() -> str:
    cfg = yaml.safe_load(PRODUCTION.read_text())
    [wasm] = wiring.listener_filters(cfg)
    plugin = json.loads(wasm["configuration"]["value"])
    [azure] = [t for t in plugin["targets"] if t["provider"] == "azure"]
    del azure["api_key_env"]
    azure["azure_ad"] = {"cluster": "entra", "tenant_id": "my-tenant-id", "client_id": "my-client-id",
                         "client_secret_env": "AZURE_CLIENT_SECRET"}
    wasm["configuration"]["value"] = json.dumps(plugin, indent=2) + "\n"
    wasm["vm_config"]["environment_variables"]["host_env_keys"] = sorted(
        {t["api_key_env"] for t in plugin["targets"] if "api_key_env" in t} | {"AZURE_CLIENT_SECRET"})
    clusters = cfg["static_resources"]["clusters"]
    [openai] = [c for c in clusters if c["name"] == "openai"]
    entra = copy.deepcopy(openai)
    entra["name"] = "entra"
    entra["load_assignment"]["cluster_name"] = "entra"
    entra["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "address"] = "login.microsoftonline.com"
    tls = entra["transport_socket"]["typed_config"]
    tls["sni"] = "login.microsoftonline.com"
    tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] = [
        {"san_type": "DNS", "matcher": {"exact": "login.microsoftonline.com"}}]
    imds = {"name": "imds", "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": "imds", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "169.254.169.254", "port_value": 80}}}}]}]}}
    entra.pop("circuit_breakers", None)  # a token endpoint, not a target: no failover retries
    clusters += [entra, imds]
    header = (
        "# GENERATED from envoy/production.yaml by tools/render_configs.py: do not edit, edit\n"
        "# envoy/production.yaml (or this generator) and run `python tools/render_configs.py`.\n"
        "# `make validate` fails when stale. envoy/production.yaml with the Azure target on Entra ID\n"
        "# tokens that the filter fetches and refreshes itself: client credentials of an app registration\n"
        "# (set my-tenant-id and my-client-id; the client secret comes from AZURE_CLIENT_SECRET in Envoy's\n"
        "# environment), through cluster \"entra\" (login.microsoftonline.com over TLS). For the machine's\n"
        "# managed identity use {\"cluster\": \"imds\", \"managed_identity\": true} instead (cluster \"imds\":\n"
        "# Azure IMDS, plain HTTP). docs/deployment.md, \"Entra ID tokens\", has the details.\n"
    )
    return header + yaml.dump(cfg, Dumper=_BlockStrDumper, sort_keys=False, width=120)


def outputs() -> dict[Path, str]:
    return {COMPOSE_ENVOY: render_compose_envoy(), K8S_CONFIGMAP: render_k8s_configmap(),
            ROUTES_ENVOY: render_routes_envoy(), AZURE_FIRST_ENVOY: render_azure_first_envoy(),
            PRODUCTION_ENTRA: render_production_entra(), PROMETHEUS_RULE: render_prometheusrule()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        rel = path.relative_to(ROOT)
        current = path.read_text() if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale.append(rel)
            diff = difflib.unified_diff(current.splitlines(True), text.splitlines(True), f"{rel} (current)",
                                        f"{rel} (generated)", n=1)
            sys.stdout.writelines(list(diff)[:40])
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    if stale:
        print("stale: " + ", ".join(map(str, stale)) + " (run `python tools/render_configs.py`)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
