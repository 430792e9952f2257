"""Tests of the harness itself: config rendering, and a real Envoy run of envoy/local.yaml *without*
the Wasm filter (routing by the cluster header the filter would set), so the harness is known to
work independently of the filter."""

from __future__ import annotations

import json
import time

import pytest
import requests

import harness
from harness import (AZURE_KEY, OPENAI_KEY, EnvoyStartError, assert_no_vm_failure, file_plugin_config,
                     render_config, validate_config, vm_failure_lines)

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
OPENAI_HEADERS = {"x-llm-failover-cluster": "openai", "Host": "api.openai.com",
                  "Authorization": f"Bearer {OPENAI_KEY}"}


def _wasm(cfg):
    return harness.wiring.listener_filters(cfg)[0]


def test_render_config_substitutions():
    cfg, info = render_config(plugin_config={"targets": []}, clusters={"openai": 1111, "azure2": 3333},
                              vm_env={"EXTRA": "1"}, host_env_keys=["HOME"])
    lst = cfg["static_resources"]["listeners"][0]
    assert lst["address"]["socket_address"]["port_value"] == info["listener_ports"][0] != 10000
    assert cfg["admin"]["address"]["socket_address"]["port_value"] == info["admin_port"] != 9901
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    port = lambda c: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][  # noqa: E731
        "socket_address"]["port_value"]
    assert port(clusters["openai"]) == 1111
    assert port(clusters["azure2"]) == 3333 and clusters["azure2"]["load_assignment"]["cluster_name"] == "azure2"
    assert port(clusters["azure"]) not in (18002, 1111, 3333)  # unmapped -> a dead port, not the file's
    w = _wasm(cfg)
    assert json.loads(w["configuration"]["value"]) == {"targets": []}
    kv = w["vm_config"]["environment_variables"]["key_values"]
    assert kv["EXTRA"] == "1" and kv["OPENAI_API_KEY"] == OPENAI_KEY  # merged
    assert w["vm_config"]["environment_variables"]["host_env_keys"] == ["HOME"]


def test_render_config_keeps_file_plugin_config_and_tls():
    cfg, _ = render_config(clusters={"azure": {"port": 2222, "tls": {"sni": "llmf-local.openai.azure.com",
                                                                     "ca_file": "/tmp/ca.pem"}}},
                           vm_env={"ONLY": "x"}, vm_env_replace=True)
    assert json.loads(_wasm(cfg)["configuration"]["value"]) == file_plugin_config()
    assert _wasm(cfg)["vm_config"]["environment_variables"]["key_values"] == {"ONLY": "x"}
    az = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "azure"][0]
    tls = az["transport_socket"]["typed_config"]
    assert tls["sni"] == "llmf-local.openai.azure.com"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == "/tmp/ca.pem"
    cfg, _ = render_config(without_wasm=True)
    assert harness.wiring.listener_filters(cfg) == []


def test_vm_failure_detection():
    log = "\n".join([
        "[info][wasm] wasm log llm_failover: started",
        "[critical][wasm] wasm log llm_failover llm_failover llm_failover: panicked at src/lib.rs:10:5:",
        "[error][wasm] Function: proxy_on_http_request_headers failed: Uncaught RuntimeError: unreachable",
    ])
    assert len(vm_failure_lines(log)) == 2
    with pytest.raises(AssertionError):
        assert_no_vm_failure(log)
    assert_no_vm_failure("[info][main] all clusters initialized")


@pytest.mark.envoy
def test_envoy_stack_without_wasm(make_stack, openai_mock, azure_mock):
    stack = make_stack(without_wasm=True)
    assert stack.running and stack.listener_port and stack.admin_port
    assert stack.admin("/ready").text.strip() == "LIVE"

    r = stack.post_json("/v1/chat/completions", CHAT, headers=OPENAI_HEADERS)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from mock openai"
    rec = openai_mock.last_request()
    assert rec["headers"]["host"] == "api.openai.com"
    assert "x-llm-failover-cluster" not in rec["headers"]  # request_headers_to_remove

    r = stack.post_json("/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
                        {"messages": CHAT["messages"]},
                        headers={"x-llm-failover-cluster": "azure", "Host": "llmf-local.openai.azure.com",
                                 "api-key": AZURE_KEY})
    assert r.status_code == 200 and "deployment gpt-4o-prod" in r.text

    # SSE passes through Envoy event by event
    azure_mock.configure(stream_delay_ms=80)
    arrivals = []
    t0 = time.monotonic()
    with requests.post(stack.url("/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"),
                       json={"messages": CHAT["messages"], "stream": True}, stream=True, timeout=20,
                       headers={"x-llm-failover-cluster": "azure", "Host": "llmf-local.openai.azure.com",
                                "api-key": AZURE_KEY}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) >= 6 and arrivals[-1] - arrivals[0] >= 0.08 * (len(arrivals) - 1) * 0.7

    st = stack.stats()
    assert st["cluster.openai.upstream_rq_total"] >= 1 and st["cluster.azure.upstream_rq_total"] >= 2
    assert stack.counter("cluster.openai.upstream_rq_200") >= 1
    assert "envoy_cluster_upstream_rq_total" in stack.prometheus()
    assert stack.prometheus_value("envoy_cluster_upstream_rq_total", envoy_cluster_name="azure") >= 2
    harness.wait_for(lambda: len(stack.access_log()) >= 3, 5, what="access log lines")
    assert any(" 200 " in line for line in stack.access_log())
    log = stack.stop()
    assert "starting main dispatch loop" in log
    assert not stack.running
    assert_no_vm_failure(log)


@pytest.mark.envoy
def test_envoy_stack_extra_cluster(make_stack, mock_factory):
    azure2 = mock_factory("azure", name="azure2", resource="llmf-local-2", deployments="gpt-4o-prod")
    stack = make_stack(without_wasm=True, clusters={"azure2": azure2.port})
    r = stack.post_json("/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
                        {"messages": CHAT["messages"]},
                        headers={"x-llm-failover-cluster": "azure2", "Host": "llmf-local-2.openai.azure.com",
                                 "api-key": AZURE_KEY})
    assert r.status_code == 200 and "mock azure2 deployment" in r.text
    assert len(azure2.requests()) == 1


@pytest.mark.envoy
def test_envoy_start_failure_is_reported(make_stack):
    def break_it(cfg):
        cfg["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"

    stack = make_stack(without_wasm=True, mutate=break_it, start=False)
    t0 = time.monotonic()
    with pytest.raises(EnvoyStartError) as ei:
        stack.start()
    assert time.monotonic() - t0 < 20
    assert "NOT_A_TYPE" in str(ei.value) or "NOT_A_TYPE" in ei.value.log


@pytest.mark.envoy
def test_validate_config_without_wasm():
    if not harness.Path(harness.envoy_bin()).exists():
        pytest.skip("no envoy binary")
    rc, out = validate_config(without_wasm=True)
    assert rc == 0, out


@pytest.mark.envoy
def test_shared_stack_fixture(stack, openai_client, openai_mock, azure_mock):
    """The shared Envoy runs envoy/local.yaml as shipped, with the filter, in front of the mocks."""
    chat = openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "Hello from mock openai"
    [rec] = openai_mock.requests()
    assert rec["headers"]["host"] == "api.openai.com"
    assert rec["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert azure_mock.requests() == []
