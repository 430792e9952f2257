"""Issue 7: envoy/production.yaml's TLS upstream clusters, run as shipped against local TLS mocks.

Only two things of the shipped file are rewritten: each cluster's endpoint (-> 127.0.0.1:<mock port>)
and the CA bundle path (-> a CA made for the test). The DNS cluster type, `sni`, the certificate
name check, the HTTP protocol options and the plugin config are the production ones, and the
provider keys reach the VM from Envoy's environment as in production. Also run: the Kubernetes
sidecar's variant of it (deploy/kubernetes/deployment.yaml adds a health listener).
"""

from __future__ import annotations

import copy
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from harness import REPO_ROOT, file_plugin_config, free_port, render_config

PRODUCTION = REPO_ROOT / "envoy" / "production.yaml"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
OPENAI_HOST = "api.openai.com"
AZURE_RESOURCE = "my-resource"  # the placeholder the shipped config carries
AZURE_HOST = f"{AZURE_RESOURCE}.openai.azure.com"
KEYS = {"OPENAI_API_KEY": "sk-tls-test-openai-key", "AZURE_OPENAI_API_KEY": "tls-test-azure-key"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

pytestmark = pytest.mark.envoy


# ----------------------------------------------------------------------------------------------
# test PKI (openssl CLI): a CA, and server certificates it signs


class Pki:
    def __init__(self, base: Path):
        self.base = base
        self.ca_cert, self.ca_key = self._make_ca("ca")

    def _run(self, *args: str):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    def _make_ca(self, stem: str) -> tuple[Path, Path]:
        cert, key = self.base / f"{stem}.crt", self.base / f"{stem}.key"
        self._run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=llm-failover {stem}",
                  "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                  "-keyout", str(key), "-out", str(cert))
        return cert, key

    def server_cert(self, *dns_names: str, ca: tuple[Path, Path] | None = None) -> tuple[str, str]:
        """A server certificate for dns_names, signed by this PKI's CA (or by `ca`)."""
        ca_cert, ca_key = ca or (self.ca_cert, self.ca_key)
        stem = self.base / uuid.uuid4().hex[:12]
        ext = stem.with_suffix(".ext")
        ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth\nsubjectAltName=" + ",".join(f"DNS:{n}" for n in dns_names) + "\n")
        self._run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={dns_names[0]}",
                  "-keyout", f"{stem}.key", "-out", f"{stem}.csr")
        self._run("x509", "-req", "-in", f"{stem}.csr", "-CA", str(ca_cert), "-CAkey", str(ca_key),
                  "-set_serial", str(uuid.uuid4().int >> 64), "-days", "2", "-sha256", "-extfile", str(ext),
                  "-out", f"{stem}.crt")
        return f"{stem}.crt", f"{stem}.key"

    def other_ca(self) -> tuple[Path, Path]:
        return self._make_ca("other-ca-" + uuid.uuid4().hex[:6])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    try:
        subprocess.run(["openssl", "version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError):
        pytest.fail("the openssl CLI is needed (make setup installs it)")
    return Pki(tmp_path_factory.mktemp("tls-pki"))


# ----------------------------------------------------------------------------------------------
# the production config, pointed at TLS mocks


def production_plugin() -> dict:
    return file_plugin_config(PRODUCTION)


def azure_target_config() -> dict:
    return next(t for t in production_plugin()["targets"] if t["provider"] == "azure")


def openai_tls_mock(mock_factory, pki: Pki, cert=None, expect_sni: str | None = OPENAI_HOST):
    cert, key = cert or pki.server_cert(OPENAI_HOST)
    return mock_factory("openai", name="openai-tls", api_key=KEYS["OPENAI_API_KEY"], tls_cert=cert, tls_key=key,
                        expect_sni=expect_sni, forbid=[KEYS["AZURE_OPENAI_API_KEY"]])


def azure_tls_mock(mock_factory, pki: Pki):
    # Azure's real certificate is a wildcard: the shipped exact name check must accept it.
    cert, key = pki.server_cert("*.openai.azure.com", "openai.azure.com")
    target = azure_target_config()
    return mock_factory("azure", name="azure-tls", api_key=KEYS["AZURE_OPENAI_API_KEY"], resource=AZURE_RESOURCE,
                        api_versions=target["api_version"], deployments=sorted(set(target["deployments"].values())),
                        tls_cert=cert, tls_key=key, expect_sni=AZURE_HOST, forbid=[KEYS["OPENAI_API_KEY"]])


def _tls_context(cluster: dict) -> dict:
    return cluster["transport_socket"]["typed_config"]


def trust_test_ca(ca_file, then=None):
    """`mutate` for the harness: the shipped CA bundle path -> the test CA (nothing else)."""
    def mutate(cfg: dict):
        for cluster in cfg["static_resources"]["clusters"]:
            trusted = _tls_context(cluster)["common_tls_context"]["validation_context"]["trusted_ca"]
            assert trusted["filename"] == SYSTEM_CA
            trusted["filename"] = str(ca_file)
        if then is not None:
            then(cfg)
    return mutate


def production_stack(make_stack, pki: Pki, openai, azure, then=None):
    return make_stack(base_config=PRODUCTION, clusters={"openai": openai.port, "azure": azure.port},
                      process_env=KEYS, mutate=trust_test_ca(pki.ca_cert, then))


def _strip_test_substitutions(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.pop("admin", None)
    for lst in cfg["static_resources"]["listeners"]:
        lst.pop("address")
    for cluster in cfg["static_resources"]["clusters"]:
        cluster.pop("load_assignment")
        _tls_context(cluster)["common_tls_context"]["validation_context"].pop("trusted_ca")
    return cfg


# ----------------------------------------------------------------------------------------------
# tests


def test_tls_stack_is_the_shipped_config_but_endpoints_and_ca(pki):
    shipped = yaml.safe_load(PRODUCTION.read_text())
    rendered, _ = render_config(PRODUCTION, clusters={"openai": 1, "azure": 2}, mutate=trust_test_ca(pki.ca_cert))
    assert _strip_test_substitutions(rendered) == _strip_test_substitutions(shipped)
    clusters = {c["name"]: c for c in rendered["static_resources"]["clusters"]}
    for name, host in (("openai", OPENAI_HOST), ("azure", AZURE_HOST)):
        assert clusters[name]["type"] in ("LOGICAL_DNS", "STRICT_DNS")
        tls = _tls_context(clusters[name])
        assert tls["sni"] == host
        assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": host}}]


def test_request_reaches_openai_over_tls_with_its_sni(make_stack, mock_factory, pki):
    openai, azure = openai_tls_mock(mock_factory, pki), azure_tls_mock(mock_factory, pki)
    stack = production_stack(make_stack, pki, openai, azure)

    r = stack.chat()
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "openai"
    assert r.headers["x-llm-failover-attempts"] == "1"
    [seen] = openai.api_requests()
    assert seen["sni"] == OPENAI_HOST
    assert seen["headers"]["host"] == OPENAI_HOST
    assert seen["headers"]["authorization"] == f"Bearer {KEYS['OPENAI_API_KEY']}"
    assert openai.tls_errors() == []
    assert azure.api_requests() == []
    assert stack.counter("cluster.openai.ssl.handshake") >= 1


def test_failover_from_openai_tls_cluster_to_azure_tls_cluster(make_stack, mock_factory, pki):
    openai, azure = openai_tls_mock(mock_factory, pki), azure_tls_mock(mock_factory, pki)
    stack = production_stack(make_stack, pki, openai, azure)
    openai.script([{"status": 503, "repeat": "forever"}])

    r = stack.chat()
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "azure"
    assert r.headers["x-llm-failover-attempts"] == "3"  # openai: retries 1, then azure
    assert [s["sni"] for s in openai.api_requests()] == [OPENAI_HOST, OPENAI_HOST]
    [seen] = azure.api_requests()
    target = azure_target_config()
    deployment = target["deployments"]["gpt-4o"]
    if target["api_version"] == "v1":
        assert (seen["path"], seen["query"]) == ("/openai/v1/chat/completions", {})
        assert seen["body"]["model"] == deployment
    else:
        assert seen["path"] == f"/openai/deployments/{deployment}/chat/completions"
    assert seen["sni"] == AZURE_HOST
    assert seen["headers"]["host"] == AZURE_HOST
    assert seen["headers"]["api-key"] == KEYS["AZURE_OPENAI_API_KEY"]
    assert azure.tls_errors() == []
    assert stack.counter("cluster.azure.ssl.handshake") >= 1


def test_streamed_failover_reaches_azure_over_tls_through_the_target_clusters(make_stack, mock_factory, pki):
    """A streamed request fails over through envoy/production.yaml's own target clusters, each
    attempt with its target's TLS, SNI and certificate check."""
    openai, azure = openai_tls_mock(mock_factory, pki), azure_tls_mock(mock_factory, pki)
    stack = production_stack(make_stack, pki, openai, azure)
    openai.script([{"status": 429, "repeat": "forever"}])

    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    r = requests.post(stack.url("/v1/chat/completions"), json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-llm-failover-target"] == "azure"
    assert r.headers["x-llm-failover-attempts"] == "3"  # openai twice (retries 1), then azure
    assert r.text.rstrip().endswith("data: [DONE]")
    assert [s["sni"] for s in openai.api_requests()] == [OPENAI_HOST, OPENAI_HOST]
    [seen] = azure.api_requests()
    assert seen["sni"] == AZURE_HOST and seen["headers"]["host"] == AZURE_HOST
    assert seen["headers"]["api-key"] == KEYS["AZURE_OPENAI_API_KEY"]
    assert "authorization" not in seen["headers"]
    if azure_target_config()["api_version"] == "v1":
        # The deployment goes in the body: the upstream filter rewrote this attempt's body.
        assert seen["body"]["model"] == azure_target_config()["deployments"]["gpt-4o"]
    assert azure.tls_errors() == [] and openai.tls_errors() == []
    assert stack.counter("cluster.azure.ssl.handshake") >= 1
    assert stack.counter("cluster.openai.ssl.handshake") >= 1


def test_wrong_sni_is_refused_by_the_upstream(make_stack, mock_factory, pki):
    """The SNI check bites: Envoy sending another name than the mock expects gets no answer from it,
    which the filter treats as a transport failure and fails over."""
    openai, azure = openai_tls_mock(mock_factory, pki), azure_tls_mock(mock_factory, pki)

    def wrong_openai_sni(cfg):
        for cluster in cfg["static_resources"]["clusters"]:
            if cluster["name"] == "openai":
                _tls_context(cluster)["sni"] = "wrong.openai.example"

    stack = production_stack(make_stack, pki, openai, azure, then=wrong_openai_sni)
    r = stack.chat()
    assert openai.api_requests() == []
    errors = openai.tls_errors()
    assert errors and {e["sni"] for e in errors} == {"wrong.openai.example"}
    assert all(e["error"] == "unexpected SNI" for e in errors)
    assert stack.counter("cluster.openai.ssl.connection_error") >= 1
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "azure"


@pytest.mark.parametrize("case", ["certificate-for-another-name", "certificate-from-an-untrusted-ca"])
def test_upstream_identity_is_verified(make_stack, mock_factory, pki, case):
    """Envoy refuses an upstream whose certificate is not for the cluster's host or not from the CA
    bundle, so the key is never sent; the filter fails over."""
    if case == "certificate-for-another-name":
        cert, stat = pki.server_cert("evil.example.com"), "cluster.openai.ssl.fail_verify_san"
    else:
        cert, stat = pki.server_cert(OPENAI_HOST, ca=pki.other_ca()), "cluster.openai.ssl.fail_verify_error"
    openai = openai_tls_mock(mock_factory, pki, cert=cert)
    azure = azure_tls_mock(mock_factory, pki)
    stack = production_stack(make_stack, pki, openai, azure)

    r = stack.chat()
    assert openai.api_requests() == []
    assert stack.counter(stat) >= 1
    assert r.status_code == 200, r.text
    assert r.headers["x-llm-failover-target"] == "azure"


def test_kubernetes_sidecar_health_listener_serves_only_ready_and_the_prometheus_stats(make_stack, mock_factory,
                                                                                      pki):
    """The --config-yaml overlay of the sidecar's command line, merged as Envoy merges it: the
    kubelet's probes get Envoy's /ready on the pod IP and Prometheus its /stats/prometheus, nothing
    else of the admin; the proxy works."""
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    [sidecar] = [c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "llm-failover"]
    args = sidecar["args"]
    overlay = yaml.safe_load(args[args.index("--config-yaml") + 1])["static_resources"]
    [health] = overlay["listeners"]
    assert health["address"]["socket_address"]["port_value"] == sidecar["ports"][0]["containerPort"]
    port = free_port()
    health["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}

    [admin_cluster] = overlay["clusters"]
    admin_endpoint = admin_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert admin_endpoint["address"] == yaml.safe_load(PRODUCTION.read_text())["admin"]["address"]

    def add_overlay(cfg):  # repeated fields of --config-yaml are appended, as here
        admin_endpoint["address"] = cfg["admin"]["address"]  # the test's admin port
        cfg["static_resources"]["listeners"] += overlay["listeners"]
        cfg["static_resources"]["clusters"] += overlay["clusters"]

    openai, azure = openai_tls_mock(mock_factory, pki), azure_tls_mock(mock_factory, pki)
    stack = production_stack(make_stack, pki, openai, azure, then=add_overlay)
    ready = requests.get(f"http://127.0.0.1:{port}/ready", timeout=10)
    assert ready.status_code == 200 and ready.text.strip() == "LIVE"
    for path in ("/stats", "/stats?format=json", "/config_dump", "/quitquitquit", "/"):
        assert requests.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 404, path
    assert stack.chat().status_code == 200
    scrape = requests.get(f"http://127.0.0.1:{port}/stats/prometheus", timeout=10)
    assert scrape.status_code == 200
    assert 'llm_failover_attempts{target="openai",status="2xx"} 1' in scrape.text.splitlines()


def test_without_allow_on_headers_stop_iteration_a_chat_request_stalls(make_stack, mock_factory, pki):
    """What docs/deployment.md says of Istio's WasmPlugin (which cannot set the flag): the body never
    reaches the filter, no provider is called, and the client waits for the stream idle timeout."""
    openai, azure = openai_tls_mock(mock_factory, pki), azure_tls_mock(mock_factory, pki)

    def as_a_wasmplugin_would(cfg):
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stream_idle_timeout"] = "2s"
        [wasm] = [f for f in hcm["http_filters"] if f["name"] == "llm_failover"]
        wasm["typed_config"]["config"]["allow_on_headers_stop_iteration"] = False

    stack = production_stack(make_stack, pki, openai, azure, then=as_a_wasmplugin_would)
    r = stack.chat()
    assert r.status_code == 504
    assert openai.api_requests() == [] and azure.api_requests() == []
    assert stack.request("GET", "/v1/models").status_code == 200  # no body to wait for: passes
