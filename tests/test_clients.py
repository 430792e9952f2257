"""Real client libraries that nobody on this project wrote, through real Envoy and the filter:
openai-node, the Vercel AI SDK (tests/clients/run.mjs) and the OpenAI Agents SDK
(tests/clients/agents_run.py, run in this process), each on Chat Completions and the Responses API, plain and streamed,
with a healthy primary and with the primary answering 429 or OpenAI's recorded text/plain 503.

The libraries' own retries are off: the app must get its answer from the gateway's failover alone.
Installed by the Makefile (`make client-tools`: npm ci of tests/clients, the pinned openai-agents
from tests/requirements.txt); without them the tests skip locally and fail in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import serve_stack, use_shared_stack
from harness import REPO_ROOT, azure_target, openai_target, plugin_config

CLIENTS = REPO_ROOT / "tests" / "clients"
if str(CLIENTS) not in sys.path:
    sys.path.insert(0, str(CLIENTS))
NODE_MODULES = CLIENTS / "node_modules"
RUN_TIMEOUT = 120  # seconds, one library call in a fresh process on a loaded machine

OPENAI_TEXT = "Hello from mock openai"
AZURE_TEXT = "Hello from mock azure deployment gpt-4o-prod"

# The Azure target is a v1 API target: it serves chat and the Responses API alike.
V1_DEPLOYMENTS = {"gpt-4o": "gpt-4o-prod"}

# (library, scenario, api, streamed, exposes the gateway's headers)
CASES = [
    ("openai-node", "chat", "chat", False, True),
    ("openai-node", "chat-stream", "chat", True, True),
    ("openai-node", "responses", "responses", False, True),
    ("openai-node", "responses-stream", "responses", True, False),  # ResponseStream hides the response
    ("ai-sdk", "generate-chat", "chat", False, True),
    ("ai-sdk", "stream-chat", "chat", True, True),
    ("ai-sdk", "generate-responses", "responses", False, True),
    ("ai-sdk", "stream-responses", "responses", True, True),
    ("openai-agents", "run/chat", "chat", False, False),
    ("openai-agents", "run-streamed/chat", "chat", True, False),
    ("openai-agents", "run/responses", "responses", False, False),
    ("openai-agents", "run-streamed/responses", "responses", True, False),
]

# What the primary (OpenAI) answers: nothing scripted, a 429, or OpenAI's own text/plain 503.
PRIMARY = {
    "healthy": [],
    "429": [{"status": 429}],
    "503": [{"status": 503, "reset_before_headers": True}],
}

SENT = {
    ("openai", "chat"): "/v1/chat/completions",
    ("openai", "responses"): "/v1/responses",
    ("azure", "chat"): "/openai/v1/chat/completions",
    ("azure", "responses"): "/openai/v1/responses",
}


def _missing(what: str):
    if os.environ.get("CI") or os.environ.get("LLMF_REQUIRE_ENVOY"):
        pytest.fail(f"missing {what} (run `make client-tools`)")
    pytest.skip(f"missing {what} (run `make client-tools`)")


def run_client(library: str, scenario: str, base_url: str) -> dict:
    if library == "openai-agents":
        # In this process: the SDK takes seconds to import, once.
        try:
            import agents_run
        except ImportError as e:
            _missing(f"openai-agents ({e})")
        run, api = scenario.split("/")
        return {"error": None, **asyncio.run(agents_run.main(run, api, base_url))}
    else:
        node = shutil.which("node")
        if node is None or not (NODE_MODULES / ".installed").exists():
            _missing("node and tests/clients/node_modules")
        cmd = [node, str(CLIENTS / "run.mjs"), library, scenario, base_url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO_ROOT)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{cmd} printed nothing; exit {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1])
    out["stderr"] = proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def _clients_stack(_openai_server, _azure_server):
    cfg = plugin_config(
        [openai_target(retries=0, cooldown=False, timeout="10s"),
         azure_target(api_version="v1", deployments=V1_DEPLOYMENTS, retries=0, cooldown=False, timeout="10s")],
        deadline="30s")
    yield from serve_stack(cfg, _openai_server, _azure_server)


@pytest.fixture
def gw(request, _clients_stack, openai_mock, azure_mock):
    """Envoy with targets openai (no retries) then an Azure v1 target, cooldowns off."""
    yield from use_shared_stack(request, _clients_stack, "the client libraries' Envoy")


@pytest.mark.parametrize("primary", list(PRIMARY))
@pytest.mark.parametrize("library, scenario, api, streamed, headers", CASES,
                         ids=[f"{c[0]}-{c[1].replace('/', '-')}" for c in CASES])
def test_client_library(gw, openai_mock, azure_mock, library, scenario, api, streamed, headers, primary):
    openai_mock.configure(stream_delay_ms=20)
    azure_mock.configure(stream_delay_ms=20)
    openai_mock.script(PRIMARY[primary])
    out = run_client(library, scenario, gw.url("/v1"))
    assert out["error"] is None, out

    served = "openai" if primary == "healthy" else "azure"
    assert out["text"] == (OPENAI_TEXT if served == "openai" else AZURE_TEXT), out
    if headers:
        assert (out["target"], out["attempts"]) == (served, "1" if served == "openai" else "2"), out
    if streamed:
        assert out["chunks"] > 1, out  # the text arrived in pieces, not as one block
    else:
        assert out["chunks"] == 0

    # One call of the app, one attempt per target: the library did not retry, the gateway failed over.
    tried = [("openai", r) for r in openai_mock.api_requests()] + [("azure", r) for r in azure_mock.api_requests()]
    expected = ["openai"] if served == "openai" else ["openai", "azure"]
    assert [name for name, _ in tried] == expected, [(n, r["path"], r["status"]) for n, r in tried]
    for name, rec in tried:
        assert rec["path"] == SENT[(name, api)]
        assert rec["stream"] is streamed
    if served == "azure":
        assert tried[-1][1]["body"]["model"] == "gpt-4o-prod" and tried[-1][1]["status"] == 200
