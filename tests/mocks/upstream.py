#!/usr/bin/env python3
"""Strict mock OpenAI and Azure OpenAI upstreams (Python standard library only).

Run one upstream per process::

    python tests/mocks/upstream.py --provider openai --port 18001 --api-key sk-local-openai-mock-key
    python tests/mocks/upstream.py --provider azure --port 18002 --api-key local-azure-mock-key \\
        --resource llmf-local --api-versions 2024-10-21,2024-06-01 \\
        --deployments gpt-4o-prod,gpt-4o-mini-default

or in-process from pytest::

    from mocks.upstream import start
    server, thread = start("azure", port=0, deployments="gpt-4o-prod")
    server.port          # the bound port
    server.stop()        # stop serving and drop every open connection

Answers are shaped as public recordings of the real services show them: tests/mocks/RECORDINGS.md
lists each fact and its source (gzip: OpenAI only, chunked; Azure's first stream event and 401
reason phrase; include_usage chunks; base64 embeddings; v1 unknown_model; ...).

The mocks are as strict as the real services about what a gateway must get right (path,
host, credential, api-version, deployment, body shape) and record everything they receive,
so tests can assert exactly what reached "the provider".  A credential sent to the wrong
provider is recorded as a *leak* and answered 400.

API surface
    OpenAI   POST /v1/chat/completions, /v1/completions, /v1/embeddings, GET /v1/models, and the
             Responses API: POST /v1/responses, GET|DELETE /v1/responses/{id},
             POST /v1/responses/{id}/cancel, GET /v1/responses/{id}/input_items.
    Azure    deployments style: POST /openai/deployments/{dep}/{chat/completions|completions|embeddings}
             ?api-version=<one of api_versions>;
             Responses, deployments style: /openai/responses[/{id}[/cancel|/input_items]]?api-version=
             <2025-03-01-preview or a later date-preview, or "preview"; or one of responses_api_versions
             when given>, older versions 400 ("...enabled only for api-version 2025-03-01-preview and later");
             v1 API: POST /openai/v1/chat/completions, /openai/v1/embeddings, /openai/v1/responses[/{id}...]
             with no api-version (or "preview"/"latest"; any other value 400), the body's model = a
             deployment (else 400 unknown_model); no /openai/v1/completions (404).
    Credentials (Azure): api-key: <key>, or Authorization: Bearer <ad_token | a token minted by the
             Entra mock with entra_token_secret, accepted only until it expires, 401 after>; on the
             v1 API also Bearer <api key> (the real v1 API accepts the key that way, as the OpenAI SDK
             sends it). An api-key next to any other Authorization is refused.

Responses API (both providers)
    The body needs model (string; Azure: a deployment) and input (string or list of items).
    The answer is a Response {"id": "resp_<48 hex>", "object": "response", "status": "completed",
    "output": [one assistant message with one output_text "Hello from mock <name>..."],
    "usage": {"input_tokens", "output_tokens", "total_tokens", ...}, "previous_response_id", ...}.
    Ids are random, so unique per instance, and remembered by the instance that created them
    (at most max_stored_responses, oldest dropped; cleared by reset): previous_response_id naming
    an id this instance does not serve -> 400 code previous_response_not_found (param
    previous_response_id); GET/DELETE/cancel/input_items of such an id -> 404. "store": false
    responses are not retrievable. "background": true answers status "queued" and completes
    background_delay_ms later (seen on GET); cancel works on background responses only (400
    "Cannot cancel a synchronous response." otherwise). DELETE answers {"id", "object":
    "response.deleted" (Azure: "response"), "deleted": true}. "stream": true answers SSE with
    `event: <type>` and `data: <json>` lines: response.created, response.in_progress,
    response.output_item.added, response.content_part.added, one response.output_text.delta per
    word (stream_delay_ms apart), response.output_text.done, response.content_part.done,
    response.output_item.done, response.completed (the full response with usage); sequence_number
    0, 1, 2, ...; no [DONE]. Scripts, x-mock-status*, fail rates, gzip (OpenAI only, not for streams) and
    close_after_events apply as for chat.

Request records (GET /__mock/requests) also say what the mock understood: api_style ("openai" |
"deployments" | "v1"), operation ("chat", "completions", "embeddings", "responses",
"responses.retrieve", "responses.delete", "responses.cancel", "responses.input_items"), model (the
body's), deployment, api_version (the query's), credential ("bearer" for OpenAI; Azure "api-key",
"ad-token", "entra", "bearer-api-key", "api-key+ad-token", ...), entra_token ({"jti", "exp_ms",
"expired"} of a verified Entra mock token), response_id (created, or named in the path). Fields
stay None when the request was refused before they were known.

Control API (same port, no auth, no host check):

    POST /__mock/script     JSON list of steps applied to the next API requests, in order:
                            {"status": 429, "retry_after": "2"}      Retry-After: 2
                            {"status": 429, "retry_after_ms": 1500}  retry-after-ms (azure: also x-ms-retry-after-ms)
                            {"status": 500} / {"status": 503} / {"status": 502} / {"status": 504}
                            {"delay_ms": 3000}                       success, answered late
                            {"close": true}                          reset the connection, no answer
                            {"status": 400, "content_filter": true}  Azure content-filter error
                            {"close_after_events": 2}                streaming: 2 SSE events then reset
                            {"status": 503, "reset_before_headers": true}  OpenAI's text/plain 503 (Envoy reset)
                            {"status": 502, "text": "..."}           any text/plain body
                            {"status": 429, "as_recorded": true}     openai: + retry-after, retry-after-ms and
                                                                     x-ratelimit-remaining-* > 0, as recorded
                            {} or {"status": 200}                    a normal answer
                            optional on any step: "repeat": N | "forever", "delay_ms": N,
                            "headers": {...} (extra response headers), "body": {...} (replaces
                            the answer's JSON body)
                            {"append": true, "steps": [...]} appends instead of replacing.
    POST /__mock/fail_rate  {"rate": 0.5, "statuses": [429, 500, 503], "seed": 1}
    POST /__mock/config     {"stream_delay_ms": 10, "background_delay_ms": 500, "entra_token_secret": "..."}
                            (unknown settings are refused with 400)
    POST /__mock/forbid     {"secrets": ["..."]}  strings that must never reach this upstream
    POST /__mock/reset      clears script, fail rate, request log, leaks, TLS errors and stored responses
                            (settings stay)
    GET  /__mock/requests   every API request received (see RequestRecord in _record())
    GET  /__mock/leaks      the leaks only
    GET  /__mock/state      script left, fail rate, counters, settings
    GET  /__mock/responses  Responses API ids this mock created: id, status, store, background, deleted,
                            model, deployment, previous_response_id, created
    GET  /__mock/tls        TLS handshake failures (wrong SNI, ...)
    GET  /__mock/health     200 {"ok": true}

Per-request forcing (handy for curl demos): request header ``x-mock-status: 429`` (optionally
``x-mock-retry-after: 1``, ``x-mock-delay-ms: 500``) forces that answer for this one request;
``x-mock-status-<name>: 429`` does so only on the mock named <name> (``--name``, default the
provider); ``x-mock-count: N`` also answers the next N-1 API requests of that mock the same way
(a gateway's retries and callouts don't carry the client's header), e.g.
``curl -H 'x-mock-status-openai: 429' -H 'x-mock-count: 2' ...`` fails OpenAI twice.
"""

from __future__ import annotations

import argparse
import base64
import copy
import gzip
import hashlib
import hmac
import json
import random
import re
import ssl
import struct
import sys
import time
import uuid
from collections import OrderedDict
from http import HTTPStatus
from urllib.parse import parse_qs

try:
    from .base import (ScriptedHandler, ScriptedServer, mask_key, serve_in_thread, serve_until_signalled,
                       split_list)
except ImportError:  # run as a script: python tests/mocks/upstream.py
    from base import (ScriptedHandler, ScriptedServer, mask_key, serve_in_thread, serve_until_signalled,
                      split_list)

OPENAI = "openai"
AZURE = "azure"

DEFAULT_OPENAI_KEY = "sk-local-openai-mock-key"
DEFAULT_AZURE_KEY = "local-azure-mock-key"
DEFAULT_RESOURCE = "llmf-local"
DEFAULT_API_VERSIONS = ("2024-10-21", "2024-06-01")
DEFAULT_DEPLOYMENTS = ("gpt-4o-prod", "gpt-4o-mini-default")
DEFAULT_STREAM_DELAY_MS = 50

OPENAI_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
AZURE_PATH_RE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")
AZURE_OPERATIONS = {"chat/completions": "chat", "completions": "completions", "embeddings": "embeddings"}
AZURE_OPERATION_NAMES = {
    "chat": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
    "responses": "Responses_Create",
    "responses.retrieve": "Responses_Get",
    "responses.delete": "Responses_Delete",
    "responses.cancel": "Responses_Cancel",
    "responses.input_items": "Responses_ListInputItems",
}

# Responses API paths: OpenAI /v1/responses..., Azure v1 /openai/v1/responses..., Azure deployments
# style /openai/responses...?api-version=... (the id and sub-resource are the same in all three).
_RESPONSES_TAIL = r"responses(?:/([^/]+)(?:/(cancel|input_items))?)?"
OPENAI_RESPONSES_RE = re.compile(r"^/v1/" + _RESPONSES_TAIL + r"$")
AZURE_RESPONSES_RE = re.compile(r"^/openai/" + _RESPONSES_TAIL + r"$")
AZURE_V1_RESPONSES_RE = re.compile(r"^/openai/v1/" + _RESPONSES_TAIL + r"$")
AZURE_V1_OPERATIONS = {"chat/completions": "chat", "embeddings": "embeddings"}  # no legacy completions
AZURE_V1_API_VERSIONS = ("preview", "latest")  # or no api-version at all
AZURE_RESPONSES_MIN_API_VERSION = "2025-03-01"  # deployments-style Responses: 2025-03-01-preview and later
AZURE_RESPONSES_VERSION_MESSAGE = ("Azure OpenAI Responses API is enabled only for api-version 2025-03-01-preview "
                                   "and later")
DEFAULT_MAX_STORED_RESPONSES = 10000

# OpenAI's own 503 when its edge loses the backend: Envoy's local reply, text/plain (RECORDINGS.md).
OPENAI_RESET_503_TEXT = ("upstream connect error or disconnect/reset before headers. reset reason: "
                         "connection termination")
# Azure's include_usage chunk carries the service's timings next to usage (RECORDINGS.md).
AZURE_LATENCY_CHECKPOINT = {"engine_tbt_ms": 3, "engine_ttft_ms": 28, "engine_ttlt_ms": 56, "pre_inference_ms": 73,
                            "service_tbt_ms": 4, "service_ttft_ms": 320, "service_ttlt_ms": 362,
                            "total_duration_ms": 293, "user_visible_ttft_ms": 248}

# Entra ID access tokens minted by tests/mocks/entra.py and checked here (shared HMAC secret).
COGNITIVE_RESOURCE = "https://cognitiveservices.azure.com"
AZURE_TOKEN_MESSAGE = ("Unauthorized. Access token is missing, invalid, audience is incorrect "
                       "(https://cognitiveservices.azure.com), or have expired.")

# Azure returns the underlying model's name, not the deployment's: guess it from the
# deployment name unless the operator gave `deployment=model`.
_AZURE_MODEL_GUESSES = (
    ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    ("gpt-4o", "gpt-4o-2024-08-06"),
    ("gpt-4-turbo", "gpt-4-turbo-2024-04-09"),
    ("gpt-4", "gpt-4"),
    ("gpt-35-turbo-instruct", "gpt-35-turbo-instruct"),
    ("gpt-35-turbo", "gpt-35-turbo"),
    ("text-embedding-3-small", "text-embedding-3-small"),
    ("text-embedding-3-large", "text-embedding-3-large"),
    ("text-embedding-ada-002", "text-embedding-ada-002"),
)

OPENAI_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "text-embedding-3-small", "gpt-3.5-turbo-instruct")

CONTENT_FILTER_RESULT = {
    "hate": {"filtered": False, "severity": "safe"},
    "jailbreak": {"filtered": True, "detected": True},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": True, "severity": "medium"},
}
CONTENT_FILTER_OK = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}


def _guess_azure_model(deployment: str) -> str:
    for prefix, model in _AZURE_MODEL_GUESSES:
        if deployment.startswith(prefix):
            return model
    return "gpt-4o-2024-08-06"


def _now() -> int:
    return int(time.time())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_entra_token(secret: str, lifetime_s: float, claims: dict | None = None, now: float | None = None) -> dict:
    """A JWT-shaped (HS256) access token for the Cognitive Services audience, signed with `secret`.

    The payload carries `exp` (unix seconds, like Entra) and `exp_ms` (unix milliseconds, the exact
    expiry the Azure mock enforces). Returns {"access_token", "exp_ms", "jti", "claims"}.
    """
    now = time.time() if now is None else now
    exp_ms = int(now * 1000 + float(lifetime_s) * 1000)
    payload = {"aud": COGNITIVE_RESOURCE, "iat": int(now), "nbf": int(now), "exp": exp_ms // 1000,
               "exp_ms": exp_ms, "jti": uuid.uuid4().hex}
    payload.update(claims or {})
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "llmf-mock"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    sig = _b64url(hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest())
    return {"access_token": f"{header}.{body}.{sig}", "exp_ms": exp_ms, "jti": payload["jti"], "claims": payload}


def verify_entra_token(secret: str, token: str, now: float | None = None) -> tuple[str, dict | None]:
    """("ok" | "expired" | "invalid", claims or None) for a token minted by mint_entra_token(secret, ...)."""
    parts = token.split(".")
    if len(parts) != 3 or not secret:
        return "invalid", None
    want = _b64url(hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(want, parts[2]):
        return "invalid", None
    try:
        claims = json.loads(_b64url_decode(parts[1]))
        exp_ms = int(claims["exp_ms"])
    except (ValueError, KeyError, TypeError):
        return "invalid", None
    if claims.get("aud") != COGNITIVE_RESOURCE:
        return "invalid", claims
    now_ms = (time.time() if now is None else now) * 1000
    return ("ok" if now_ms < exp_ms else "expired"), claims


def _json_type(value) -> str:
    """How OpenAI names a JSON value's type in its 'Invalid type' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _hex_id(prefix: str) -> str:
    """resp_/msg_ ids shaped like OpenAI's: the prefix and 48 hex digits."""
    return prefix + uuid.uuid4().hex + uuid.uuid4().hex[:16]


def _responses_operation(method: str, response_id: str | None, sub: str | None) -> str | None:
    if response_id is None:
        return "responses" if method == "POST" else None
    if sub is None:
        return {"GET": "responses.retrieve", "DELETE": "responses.delete"}.get(method)
    if sub == "cancel":
        return "responses.cancel" if method == "POST" else None
    return "responses.input_items" if method == "GET" else None


def _approx_tokens(value) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return max(1, (len(value) + 3) // 4)
    if isinstance(value, (int, float)):
        return 1
    if isinstance(value, list):
        return sum(_approx_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(_approx_tokens(v) for v in value.values())
    return 1


# ----------------------------------------------------------------------------------------------
# Server


class MockServer(ScriptedServer):
    request_queue_size = 128

    def __init__(
        self,
        provider: str,
        port: int = 0,
        *,
        api_key: str | None = None,
        host: str | None = None,
        resource: str | None = None,
        api_versions=None,
        deployments=None,
        ad_token: str | None = None,
        stream_delay_ms: int = DEFAULT_STREAM_DELAY_MS,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        expect_sni: str | None = None,
        name: str | None = None,
        forbid=None,
        models=None,
        region: str = "eastus",
        bind: str = "127.0.0.1",
        quiet: bool = True,
        entra_token_secret: str | None = None,
        responses_api_versions=None,
        background_delay_ms: int = 0,
        max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES,
    ):
        if provider not in (OPENAI, AZURE):
            raise ValueError(f"provider must be {OPENAI!r} or {AZURE!r}, got {provider!r}")
        self.provider = provider
        self.name = name or provider
        self.api_key = api_key or (DEFAULT_OPENAI_KEY if provider == OPENAI else DEFAULT_AZURE_KEY)
        self.resource = resource or DEFAULT_RESOURCE
        if host:
            self.expected_host = host
        else:
            self.expected_host = "api.openai.com" if provider == OPENAI else f"{self.resource}.openai.azure.com"
        self.api_versions = split_list(api_versions) or list(DEFAULT_API_VERSIONS)
        self.deployments: dict[str, str] = {}
        for item in split_list(deployments) or list(DEFAULT_DEPLOYMENTS):
            dep, _, model = item.partition("=")
            self.deployments[dep] = model or _guess_azure_model(dep)
        self.ad_token = ad_token
        self.entra_token_secret = entra_token_secret or None  # azure: accept Entra mock tokens until expiry
        # azure deployments-style Responses: explicit list, or empty = 2025-03-01-preview and later + "preview"
        self.responses_api_versions = split_list(responses_api_versions)
        self.background_delay_ms = int(background_delay_ms)
        self.max_stored_responses = max(1, int(max_stored_responses))
        # Responses API: every response id this instance created (store: false ones too, flagged),
        # oldest first, bounded by max_stored_responses.
        self.responses: OrderedDict[str, dict] = OrderedDict()
        self.models = split_list(models)  # openai: accepted models; empty = any
        self.region = region
        self.stream_delay_ms = int(stream_delay_ms)
        self.quiet = quiet
        self.expect_sni = expect_sni
        self.tls = bool(tls_cert)

        self._init_state()
        self.fail_rate: dict | None = None
        self.rng = random.Random()
        self.tls_errors: list[dict] = []
        if forbid is None:
            # By default the other provider's default (local) key must never arrive here.
            forbid = [DEFAULT_AZURE_KEY] if provider == OPENAI else [DEFAULT_OPENAI_KEY]
        self.forbidden: list[str] = [f for f in split_list(forbid) if f != self.api_key]

        super().__init__((bind, port), MockHandler)
        self.port = self.server_address[1]

        if tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls_cert, tls_key)
            ctx.set_alpn_protocols(["http/1.1"])
            ctx.sni_callback = self._sni_callback
            self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    # -- TLS -----------------------------------------------------------------------------------

    def _sni_callback(self, sslsock, server_name, _ctx):
        try:
            sslsock._mock_sni = server_name
        except Exception:  # pragma: no cover - SSLObject without __dict__
            pass
        if self.expect_sni is not None and server_name != self.expect_sni:
            with self.lock:
                self.tls_errors.append(
                    {"time": time.time(), "error": "unexpected SNI", "sni": server_name, "expected": self.expect_sni}
                )
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    # -- state ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def reset(self):
        with self.lock:
            self.script = []
            self.fail_rate = None
            self.log = []
            self.leaks = []
            self.tls_errors = []
            self.responses = OrderedDict()
            self._seq = 0

    def next_step(self) -> dict | None:
        """The script's next step; with the script empty, a fail-rate failure at random."""
        step = super().next_step()
        if step is not None:
            return step
        with self.lock:
            fr = self.fail_rate
            if fr and self.rng.random() < fr["rate"]:
                return {"status": self.rng.choice(fr["statuses"]), "_from": "fail_rate"}
        return None

    def _views(self) -> dict:
        return {
            "/__mock/tls": lambda: self.tls_errors,
            "/__mock/responses": lambda: [self.response_summary(e) for e in self.responses.values()],
        }

    def _set(self, path: str, data) -> tuple[int, object] | None:
        if path == "/__mock/fail_rate":
            if not data or not float(data.get("rate", 0)):
                with self.lock:
                    self.fail_rate = None
                return (200, {"ok": True, "fail_rate": None})
            statuses = [int(x) for x in data.get("statuses") or [429, 500, 503]]
            rate = float(data["rate"])
            if not 0 <= rate <= 1:
                raise ValueError("rate must be within [0, 1]")
            with self.lock:
                self.fail_rate = {"rate": rate, "statuses": statuses}
                if "seed" in data:
                    self.rng.seed(data["seed"])
            return (200, {"ok": True, "fail_rate": self.fail_rate})
        if path == "/__mock/config":
            data = data or {}
            unknown = set(data) - {"stream_delay_ms", "background_delay_ms", "entra_token_secret"}
            if unknown:
                raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
            with self.lock:
                if "stream_delay_ms" in data:
                    self.stream_delay_ms = int(data["stream_delay_ms"])
                if "background_delay_ms" in data:
                    self.background_delay_ms = int(data["background_delay_ms"])
                if "entra_token_secret" in data:
                    self.entra_token_secret = data["entra_token_secret"] or None
            return (200, self.state())
        return None

    def state(self) -> dict:
        with self.lock:
            return {
                "provider": self.provider,
                "name": self.name,
                "port": self.port,
                "expected_host": self.expected_host,
                "api_versions": self.api_versions,
                "deployments": self.deployments,
                "stream_delay_ms": self.stream_delay_ms,
                "background_delay_ms": self.background_delay_ms,
                "responses_api_versions": self.responses_api_versions or None,
                "entra_tokens": bool(self.entra_token_secret),
                "responses_stored": sum(1 for e in self.responses.values() if e["store"] and not e["deleted"]),
                "tls": self.tls,
                "expect_sni": self.expect_sni,
                "script": [dict(s) for s in self.script],
                "fail_rate": self.fail_rate,
                "requests": len(self.log),
                "leaks": len(self.leaks),
                "tls_errors": len(self.tls_errors),
            }

    # -- Responses API store -------------------------------------------------------------------

    def remember_response(self, entry: dict):
        with self.lock:
            self.responses[entry["id"]] = entry
            while len(self.responses) > self.max_stored_responses:
                self.responses.popitem(last=False)

    def stored_response(self, response_id) -> dict | None:
        """The entry of a response this instance created and still serves (stored, not deleted)."""
        with self.lock:
            e = self.responses.get(response_id) if isinstance(response_id, str) else None
            if e is None or not e["store"] or e["deleted"]:
                return None
            return e

    def current_response(self, entry: dict) -> dict:
        """A stored response as GET would show it now (a background one completes after background_delay_ms)."""
        with self.lock:
            if entry["response"]["status"] in ("queued", "in_progress") and entry["final"] is not None \
                    and time.time() >= entry["ready_at"]:
                entry["response"] = entry["final"]
                entry["final"] = None
            return copy.deepcopy(entry["response"])

    def response_summary(self, e: dict) -> dict:
        return {"id": e["id"], "status": self.current_response(e)["status"], "store": e["store"],
                "background": e["background"], "deleted": e["deleted"], "model": e["model"],
                "deployment": e["deployment"], "previous_response_id": e["previous_response_id"],
                "created": e["created"]}


# ----------------------------------------------------------------------------------------------
# Request handler


class MockHandler(ScriptedHandler):
    server: MockServer

    # --- plumbing ---------------------------------------------------------------------------

    def _handshake(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                sni = getattr(self.request, "_mock_sni", None)
                sni_rejected = self.server.expect_sni is not None and sni != self.server.expect_sni
                if not sni_rejected:  # an SNI rejection was recorded by the SNI callback already
                    with self.server.lock:
                        self.server.tls_errors.append({"time": time.time(), "error": str(e), "sni": sni})
                raise
            self.request.settimeout(None)

    def version_string(self):
        return "cloudflare" if self.server.provider == OPENAI else "Microsoft-HTTPAPI/2.0"

    def _accepts_gzip(self) -> bool:
        ae = self.headers.get("Accept-Encoding") or ""
        for part in ae.split(","):
            token, _, params = part.strip().partition(";")
            if token.strip().lower() in ("gzip", "*"):
                m = re.search(r"q\s*=\s*([0-9.]+)", params)
                if m and float(m.group(1)) == 0:
                    return False
                return True
        return False

    def _base_headers(self) -> dict:
        s = self.server
        if s.provider == OPENAI:
            return {
                "openai-organization": "org-mock",
                "openai-processing-ms": "12",
                "openai-version": "2020-10-01",
                "x-request-id": "req_" + uuid.uuid4().hex,
                "x-ratelimit-limit-requests": "10000",
                "x-ratelimit-remaining-requests": "9999",
                "x-ratelimit-limit-tokens": "30000000",
                "x-ratelimit-remaining-tokens": "29999000",
                "x-ratelimit-reset-requests": "6ms",
                "x-ratelimit-reset-tokens": "0s",
                "x-mock-provider": s.name,
            }
        apim = str(uuid.uuid4())
        return {
            "apim-request-id": apim,
            "x-request-id": apim,
            "x-ms-region": {"eastus": "East US", "swedencentral": "Sweden Central"}.get(s.region, s.region),
            "x-ms-client-request-id": self.headers.get("x-ms-client-request-id") or "Not-Set",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-remaining-tokens": "99000",
            "azureml-model-session": "d001-20240901",
            "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
            "x-content-type-options": "nosniff",
            "x-mock-provider": s.name,
        }

    def _send_json(self, status: int, obj, extra_headers: dict | None = None, phrase: str | None = None,
                   headers: dict | None = None):
        """A JSON answer. OpenAI gzips it when the client accepts gzip, and then sends it chunked with no
        Content-Length; Azure never compresses (tests/mocks/RECORDINGS.md). `headers` replaces the
        provider's usual headers (an answer recorded with fewer), `phrase` the status line's reason."""
        body = json.dumps(obj, separators=(",", ":")).encode() if not isinstance(obj, bytes) else obj
        headers = dict(headers) if headers is not None else self._base_headers()
        headers["Content-Type"] = "application/json"
        gzipped = self.server.provider == OPENAI and self._accepts_gzip() and bool(body)
        if gzipped:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
            headers["Transfer-Encoding"] = "chunked"
            headers["Vary"] = "Accept-Encoding"
        if extra_headers:
            headers.update({k: str(v) for k, v in extra_headers.items()})
        if not gzipped:
            headers["Content-Length"] = str(len(body))
        self._send_raw(status, headers, body, chunked=gzipped, phrase=phrase)

    def _send_text(self, status: int, text: str, headers: dict, phrase: str | None = None):
        """A text/plain answer with exactly the given headers (plus Content-Type and Content-Length)."""
        body = text.encode()
        headers = {**headers, "Content-Type": "text/plain", "Content-Length": str(len(body))}
        self._send_raw(status, headers, body, chunked=False, phrase=phrase)

    def _send_raw(self, status: int, headers: dict, body: bytes, chunked: bool, phrase: str | None):
        self._set_status(status)
        self.send_response(status, phrase)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
        self.wfile.flush()

    def _handle(self, rec, split, body: bytes):
        self._handle_api(rec, split.path, split.query, body)

    # --- recording ----------------------------------------------------------------------------

    def _record(self, split, body: bytes) -> dict:
        s = self.server
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        text = body.decode("utf-8", errors="replace")
        try:
            parsed = json.loads(text) if text.strip() else None
            is_json = parsed is not None
        except ValueError:
            parsed, is_json = None, False
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        with s.lock:
            s._seq += 1
            rec = {
                "seq": s._seq,
                "time": time.time(),
                "method": self.command,
                "path": split.path,
                "raw_path": self.path,
                "query": query,
                "headers": headers,
                "body": parsed if is_json else (text if text else None),
                "body_is_json": is_json,
                "body_bytes": len(body),
                "status": None,
                "stream": bool(is_json and isinstance(parsed, dict) and parsed.get("stream") is True),
                "leak": False,
                "leak_reasons": [],
                "step": None,
                "closed": False,
                "provider": s.provider,
                "mock": s.name,
                "sni": getattr(self.request, "_mock_sni", None),
                # what the mock understood (None until known): see the module docstring
                "api_style": None,
                "operation": None,
                "model": parsed.get("model") if is_json and isinstance(parsed, dict) else None,
                "deployment": None,
                "api_version": query.get("api-version"),
                "credential": None,
                "entra_token": None,
                "response_id": None,
            }
            s.log.append(rec)
        return rec

    def _leak(self, rec: dict, reasons: list[str]):
        """One leak entry per request (reason: all reasons joined)."""
        s = self.server
        with s.lock:
            rec["leak"] = True
            rec["leak_reasons"].extend(reasons)
            s.leaks.append({"seq": rec["seq"], "reason": "; ".join(reasons), "reasons": list(reasons),
                            "method": rec["method"], "path": rec["raw_path"], "mock": s.name})

    # --- errors in each provider's shape --------------------------------------------------------

    def _oai_error(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        self._send_json(status, {"error": {"message": message, "type": type_, "param": param, "code": code}}, headers)

    def _az_error(self, status, code, message, headers=None):
        self._send_json(status, {"error": {"code": code, "message": message}}, headers)

    def _invalid(self, status, message, param=None, code=None):
        """A request-validation error: both providers use OpenAI's shape for these."""
        self._oai_error(status, message, "invalid_request_error", param, code)

    def _scripted_error(self, step: dict, op: str, model: str, api_version: str | None):
        s = self.server
        status = int(step["status"])
        headers = {str(k): str(v) for k, v in (step.get("headers") or {}).items()}
        ra = step.get("retry_after")
        ra_ms = step.get("retry_after_ms")
        if ra is not None:
            headers["Retry-After"] = str(ra)
        if ra_ms is not None:
            headers["retry-after-ms"] = str(int(ra_ms))
            if s.provider == AZURE:
                headers["x-ms-retry-after-ms"] = str(int(ra_ms))
        if "body" in step:
            return self._send_json(status, step["body"], headers)
        if step.get("reset_before_headers"):
            return self._send_text(status, OPENAI_RESET_503_TEXT, {"x-mock-provider": s.name, **headers})
        if "text" in step:
            return self._send_text(status, str(step["text"]), {**self._base_headers(), **headers})
        if step.get("as_recorded") and s.provider == OPENAI and status == 429:
            # A 429 that also says "retry after" in two units while x-ratelimit-* say the budget is not spent.
            wait_ms = int(ra_ms) if ra_ms is not None else (int(float(ra) * 1000) if ra is not None else 1000)
            if ra is None:
                headers["Retry-After"] = str(max(0, round(wait_ms / 1000)))
            if ra_ms is None:
                headers["retry-after-ms"] = str(wait_ms)
            headers.setdefault("x-ratelimit-remaining-requests", "9999")
            headers.setdefault("x-ratelimit-remaining-tokens", "29999000")
        secs = ra if ra is not None else (max(1, round(int(ra_ms) / 1000)) if ra_ms is not None else None)
        if step.get("content_filter"):
            if s.provider == AZURE:
                return self._send_json(status, {"error": {
                    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
                               "management policy. Please modify your prompt and retry. To learn more about our "
                               "content filtering policies please read our documentation: "
                               "https://go.microsoft.com/fwlink/?linkid=2198766",
                    "type": None, "param": "prompt", "code": "content_filter", "status": status,
                    "innererror": {"code": "ResponsibleAIPolicyViolation",
                                   "content_filter_result": CONTENT_FILTER_RESULT}}}, headers)
            return self._oai_error(status, "Invalid prompt: your prompt was flagged as potentially violating our "
                                   "usage policy. Please try again with a different prompt.",
                                   "invalid_request_error", None, "invalid_prompt", headers)
        if s.provider == OPENAI:
            if status == 429:
                wait = f"{secs}s" if secs is not None else "20s"
                headers.setdefault("x-ratelimit-remaining-requests", "0")
                headers.setdefault("x-ratelimit-reset-requests", wait)
                return self._oai_error(429, f"Rate limit reached for {model or 'gpt-4o'} in organization org-mock on "
                                       f"requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again "
                                       f"in {wait}. Visit https://platform.openai.com/account/rate-limits to learn "
                                       f"more.", "requests", None, "rate_limit_exceeded", headers)
            if status == 500:
                return self._oai_error(500, "The server had an error while processing your request. Sorry about "
                                       "that!", "server_error", None, None, headers)
            if status == 502:
                return self._oai_error(502, "Bad gateway.", "cf_bad_gateway", None, None, headers)
            if status == 503:
                return self._oai_error(503, "The engine is currently overloaded, please try again later.",
                                       "server_error", None, None, headers)
            if status == 504:
                return self._oai_error(504, "Gateway timeout.", "cf_gateway_timeout", None, None, headers)
            if status >= 500:
                return self._oai_error(status, "The server had an error while processing your request.",
                                       "server_error", None, None, headers)
            phrase = _phrase(status)
            return self._oai_error(status, f"{phrase} (mock scripted {status})", "invalid_request_error", None,
                                   None, headers)
        # azure
        if status == 429:
            wait = secs if secs is not None else 2
            headers.setdefault("Retry-After", str(wait))
            headers.setdefault("x-ratelimit-remaining-requests", "0")
            return self._az_error(429, "429", f"Requests to the {AZURE_OPERATION_NAMES.get(op, 'ChatCompletions_Create')}"
                                  f" Operation under Azure OpenAI API version {api_version} have exceeded token rate "
                                  f"limit of your current OpenAI S0 pricing tier. Please retry after {wait} seconds. "
                                  f"Please go here: https://aka.ms/oai/quotaincrease if you would like to further "
                                  f"increase the default rate limit.", headers)
        if status == 500:
            return self._oai_error(500, "The server had an error while processing your request. Sorry about that!",
                                   "server_error", None, None, headers)
        if status == 503:
            return self._az_error(503, "ServiceUnavailable", "The service is temporarily unable to process your "
                                  "request. Please try again later.", headers)
        if status == 502:
            return self._az_error(502, "BadGateway", "Bad gateway.", headers)
        if status == 504:
            return self._az_error(504, "Timeout", "The operation was timeout.", headers)
        if status == 408:
            return self._az_error(408, "Timeout", "The operation was timeout.", headers)
        return self._az_error(status, str(status), _phrase(status), headers)

    # --- API ----------------------------------------------------------------------------------

    def _check_host(self, rec) -> bool:
        s = self.server
        if s.expected_host == "*":
            return True
        host = (self.headers.get("Host") or "").strip()
        hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if hostname.lower() != s.expected_host.lower():
            rec["host_mismatch"] = True
            self._send_json(421, {"error": {"message": f"Misdirected request: this is the mock of {s.expected_host}, "
                                                       f"but the Host header is {host!r}",
                                            "type": "invalid_request_error", "param": None, "code": "wrong_host"}})
            return False
        return True

    def _check_leaks(self, rec, body: bytes) -> bool:
        s = self.server
        reasons = []
        auth = self.headers.get("Authorization") or ""
        if s.provider == OPENAI:
            if self.headers.get("api-key") is not None:
                reasons.append("api-key header sent to OpenAI (an Azure credential)")
        else:
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
            if token.startswith("sk-"):
                reasons.append("Authorization header carrying an OpenAI key (sk-...) sent to Azure")
        if s.forbidden:
            blob = "\n".join(f"{k}: {v}" for k, v in self.headers.items()) + "\n" + self.path + "\n" + \
                body.decode("utf-8", errors="replace")
            for i, secret in enumerate(s.forbidden):
                if secret and secret in blob:
                    reasons.append(f"forbidden secret #{i} ({mask_key(secret)}) reached {s.name}")
        leaked = bool(reasons)
        if leaked:
            self._leak(rec, reasons)
            if s.provider == OPENAI:
                self._oai_error(400, "Mock detected a leaked credential: this request carries a credential that "
                                "must never be sent to OpenAI.", "invalid_request_error", None, "credential_leak")
            else:
                self._az_error(400, "CredentialLeak", "Mock detected a leaked credential: this request carries a "
                               "credential that must never be sent to Azure OpenAI.")
        return not leaked

    def _handle_api(self, rec, path, query, body):
        s = self.server
        if not self._check_host(rec):
            return
        if not self._check_leaks(rec, body):
            return
        if s.provider == OPENAI:
            self._handle_openai(rec, path, body, query)
        else:
            self._handle_azure(rec, path, query, body)

    def _handle_openai(self, rec, path, body, query=""):
        s = self.server
        rec["api_style"] = "openai"
        auth = self.headers.get("Authorization")
        if not auth or not auth.startswith("Bearer ") or not auth[7:].strip():
            return self._oai_error(401, "You didn't provide an API key. You need to provide your API key in an "
                                   "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                                   "or as the password field (with blank username) if you're accessing the API from "
                                   "your browser and are prompted for a username. You can obtain an API key from "
                                   "https://platform.openai.com/account/api-keys.",
                                   "invalid_request_error", None, "invalid_api_key")
        if auth != f"Bearer {s.api_key}":
            return self._oai_error(401, f"Incorrect API key provided: {mask_key(auth[7:].strip())}. You can find "
                                   f"your API key at https://platform.openai.com/account/api-keys.",
                                   "invalid_request_error", None, "invalid_api_key")
        rec["credential"] = "bearer"
        if path in ("/v1/models", "/v1/models/") and self.command == "GET":
            return self._send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"}
                for m in (s.models or OPENAI_MODELS)]})
        rm = OPENAI_RESPONSES_RE.match(path)
        if rm is not None:
            op = _responses_operation(self.command, rm.group(1), rm.group(2))
            if op is None:
                return self._oai_error(404, f"Invalid URL ({self.command} {path})", "invalid_request_error", None,
                                       "unknown_url")
            return self._responses(rec, op, rm.group(1), query, body, None)
        op = OPENAI_OPERATIONS.get(path)
        if op is None or self.command != "POST":
            return self._oai_error(404, f"Invalid URL ({self.command} {path})", "invalid_request_error", None,
                                   "unknown_url")
        rec["operation"] = op
        if not self._check_content_type():
            return
        req = self._parse_body(body)
        if req is None:
            return
        model = req.get("model")
        if not isinstance(model, str) or not model:
            return self._invalid(400, "you must provide a model parameter")
        if not self._validate_op(op, req):
            return
        if s.models and model not in s.models:
            return self._oai_error(404, f"The model `{model}` does not exist or you do not have access to it.",
                                   "invalid_request_error", None, "model_not_found")
        self._answer(rec, op, req, model, None, f"mock {s.name}", None)

    def _azure_credential(self, rec, v1: bool) -> str | None:
        """The credential kind this request authenticates with, or None after answering 401.

        api-key: <key> (optionally with Authorization: Bearer <ad_token | Entra mock token>), or
        Authorization: Bearer <ad_token | Entra mock token>; on the v1 API also Bearer <api key>
        (what the OpenAI SDK sends with api_key=<azure key>, and the real v1 API accepts).
        """
        s = self.server
        api_key = self.headers.get("api-key")
        auth = self.headers.get("Authorization")

        def bearer(value: str) -> str | None:
            if not value.startswith("Bearer "):
                return None
            token = value[7:]
            if s.ad_token and token == s.ad_token:
                return "ad-token"
            if s.entra_token_secret:
                verdict, claims = verify_entra_token(s.entra_token_secret, token)
                if claims is not None and verdict != "invalid":
                    rec["entra_token"] = {"jti": claims.get("jti"), "exp_ms": claims.get("exp_ms"),
                                          "expired": verdict == "expired"}
                if verdict == "ok":
                    return "entra"
            if v1 and token == s.api_key:
                return "bearer-api-key"
            return None

        if api_key is not None:
            kind = None
            if api_key == s.api_key:
                if auth is None:
                    kind = "api-key"
                else:
                    extra = bearer(auth)
                    kind = "api-key+" + extra if extra else None
            if kind:
                rec["credential"] = kind
                return kind
        elif auth is not None:
            kind = bearer(auth)
            if kind:
                rec["credential"] = kind
                return kind
            self._az_error(401, "401", AZURE_TOKEN_MESSAGE)
            return None
        # Recorded: reason phrase "PermissionDenied", only Content-Length/Type, Date and apim-request-id.
        self._send_json(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key or "
                                        "wrong API endpoint. Make sure to provide a valid key for an active "
                                        "subscription and use a correct regional API endpoint for your resource."}},
                        phrase="PermissionDenied",
                        headers={"apim-request-id": str(uuid.uuid4()), "x-mock-provider": s.name})
        return None

    def _deployment_not_found(self):
        return self._send_json(404, {"error": {
            "type": "invalid_request_error", "code": "DeploymentNotFound",
            "message": "The API deployment for this resource does not exist. If you created the deployment within "
                       "the last 5 minutes, please wait a moment and try again."}})

    def _unknown_model(self, model: str):
        """The v1 API names no deployment in its path: a body model that is none answers 400 unknown_model."""
        return self._send_json(400, {"error": {"code": "unknown_model", "message": f"Unknown model: {model}",
                                               "details": f"Unknown model: {model}"}})

    def _handle_azure(self, rec, path, query, body):
        s = self.server
        qs = parse_qs(query, keep_blank_values=True)
        api_version = (qs.get("api-version") or [None])[-1]
        if path.startswith("/openai/v1/"):
            return self._handle_azure_v1(rec, path, api_version, query, body)
        rm = AZURE_RESPONSES_RE.match(path)
        if rm is not None:
            return self._handle_azure_responses(rec, path, rm, api_version, query, body)
        m = AZURE_PATH_RE.match(path)
        if not api_version or m is None or self.command != "POST":
            return self._az_error(404, "404", "Resource not found")
        rec["api_style"] = "deployments"
        if not self._azure_credential(rec, v1=False):
            return
        if api_version not in s.api_versions:
            return self._az_error(400, "BadRequest", "API version not supported")
        deployment, op = m.group(1), AZURE_OPERATIONS[m.group(2)]
        rec["operation"], rec["deployment"] = op, deployment
        if deployment not in s.deployments:
            return self._deployment_not_found()
        if not self._check_content_type():
            return
        req = self._parse_body(body)
        if req is None:
            return
        if not self._validate_op(op, req):
            return
        model = s.deployments[deployment]
        self._answer(rec, op, req, model, api_version, f"mock {s.name} deployment {deployment}", deployment)

    def _handle_azure_v1(self, rec, path, api_version, query, body):
        """The v1 API: /openai/v1/{chat/completions,embeddings,responses...}, body model = a deployment."""
        s = self.server
        rec["api_style"] = "v1"
        tail = path[len("/openai/v1/"):]
        rm = AZURE_V1_RESPONSES_RE.match(path)
        if rm is not None:
            op = _responses_operation(self.command, rm.group(1), rm.group(2))
        else:
            op = AZURE_V1_OPERATIONS.get(tail) if self.command == "POST" else None
        if op is None:
            return self._az_error(404, "404", "Resource not found")
        rec["operation"] = op
        if not self._azure_credential(rec, v1=True):
            return
        if api_version is not None and api_version not in AZURE_V1_API_VERSIONS:
            return self._az_error(400, "BadRequest", "API version not supported")
        if rm is not None:
            return self._responses(rec, op, rm.group(1), query, body, api_version or "v1")
        if not self._check_content_type():
            return
        req = self._parse_body(body)
        if req is None:
            return
        model = req.get("model")
        if not isinstance(model, str) or not model:
            return self._invalid(400, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
        if model not in s.deployments:
            return self._unknown_model(model)
        rec["deployment"] = model
        if not self._validate_op(op, req):
            return
        self._answer(rec, op, req, s.deployments[model], api_version or "v1",
                     f"mock {s.name} deployment {model}", model)

    def _handle_azure_responses(self, rec, path, rm, api_version, query, body):
        """Deployments-style Responses: /openai/responses[/{id}[/cancel|/input_items]]?api-version=..."""
        s = self.server
        op = _responses_operation(self.command, rm.group(1), rm.group(2))
        if not api_version or op is None:
            return self._az_error(404, "404", "Resource not found")
        rec["api_style"], rec["operation"] = "deployments", op
        if not self._azure_credential(rec, v1=False):
            return
        if s.responses_api_versions:
            problem = None if api_version in s.responses_api_versions else AZURE_RESPONSES_VERSION_MESSAGE
        elif api_version == "preview":
            problem = None
        else:
            dm = re.fullmatch(r"(\d{4}-\d{2}-\d{2})(-preview)?", api_version)
            if dm is None:
                problem = "API version not supported"
            elif dm.group(2) and dm.group(1) >= AZURE_RESPONSES_MIN_API_VERSION:
                problem = None
            else:
                problem = AZURE_RESPONSES_VERSION_MESSAGE
        if problem:
            return self._az_error(400, "BadRequest", problem)
        self._responses(rec, op, rm.group(1), query, body, api_version)

    # --- Responses API (both providers) -----------------------------------------------------------

    def _response_not_found(self, response_id):
        return self._oai_error(404, f"Response with id '{response_id}' not found.", "invalid_request_error", None,
                               None)

    def _responses(self, rec, op, response_id, query, body, api_version):
        """POST /responses, GET/DELETE /responses/{id}, POST .../cancel, GET .../input_items.

        The path, method, credential and (Azure) api-version were checked by the caller; api_version
        is None for OpenAI, "v1" (or "preview"/"latest") for Azure's v1 API, the dated version else.
        """
        s = self.server
        rec["operation"] = op
        if op != "responses":
            rec["response_id"] = response_id
            entry = s.stored_response(response_id)
            if entry is None:
                return self._response_not_found(response_id)
            return self._responses_by_id(rec, op, entry, query, api_version)
        if not self._check_content_type():
            return
        if not body.strip():
            return self._invalid(400, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
        req = self._parse_body(body)
        if req is None:
            return
        model = req.get("model")
        if model is None:
            return self._invalid(400, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
        if not isinstance(model, str) or not model:
            return self._invalid(400, f"Invalid type for 'model': expected a string, but got {_json_type(model)} "
                                 "instead.", "model", "invalid_type")
        deployment = None
        if s.provider == AZURE:
            if model not in s.deployments:  # the v1 API has no deployment in its path
                return self._unknown_model(model) if rec["api_style"] == "v1" else self._deployment_not_found()
            deployment = rec["deployment"] = model
            resp_model, who = s.deployments[model], f"mock {s.name} deployment {model}"
        else:
            if s.models and model not in s.models:
                return self._oai_error(404, f"The model `{model}` does not exist or you do not have access to it.",
                                       "invalid_request_error", None, "model_not_found")
            resp_model, who = model, f"mock {s.name}"
        if not self._validate_responses(req):
            return
        prev_id = req.get("previous_response_id")
        prev = s.stored_response(prev_id) if prev_id is not None else None
        if prev_id is not None and prev is None:
            return self._invalid(400, f"Previous response with id '{prev_id}' not found.", "previous_response_id",
                                 "previous_response_not_found")
        step = self._take_step(rec)
        status = int(step.get("status", 200))
        if status != 200:
            return self._scripted_error(step, op, model, api_version)
        extra = {str(k): str(v) for k, v in (step.get("headers") or {}).items()}
        if "body" in step:
            return self._send_json(200, step["body"], extra)

        content = f"Hello from {who}"
        final = self._response_object(req, resp_model, content, prev)
        rid = rec["response_id"] = final["id"]
        store = req.get("store") is not False
        background = req.get("background") is True
        shown = final
        if background and not req.get("stream"):
            shown = copy.deepcopy(final)
            shown.update({"status": "queued", "output": [], "usage": None, "completed_at": None})
        s.remember_response({
            "id": rid, "response": shown, "final": final if shown is not final else None,
            "ready_at": time.time() + s.background_delay_ms / 1000.0, "input_items": self._input_items(req["input"]),
            "store": store, "background": background, "deleted": False, "model": model, "deployment": deployment,
            "previous_response_id": prev_id, "created": time.time()})
        if req.get("stream") is True:
            return self._send_sse(self._response_events(final), extra, step.get("close_after_events"))
        return self._send_json(200, shown, extra)

    def _responses_by_id(self, rec, op, entry, query, api_version):
        s = self.server
        qs = parse_qs(query, keep_blank_values=True)
        limit, order, after = 20, "desc", None
        if op == "responses.retrieve" and (qs.get("stream") or [""])[-1].lower() == "true":
            return self._invalid(400, "Streaming a stored response again (stream=true) is not supported by this "
                                 "mock.", "stream", "unsupported_value")
        if op == "responses.input_items":
            raw_limit = (qs.get("limit") or ["20"])[-1]
            if not re.fullmatch(r"-?\d+", raw_limit):
                return self._invalid(400, f"Invalid 'limit': expected an integer, but got '{raw_limit}' instead.",
                                     "limit", "invalid_type")
            limit = int(raw_limit)
            if not 1 <= limit <= 100:
                code = "integer_below_min_value" if limit < 1 else "integer_above_max_value"
                return self._invalid(400, f"Invalid 'limit': integer {'below minimum' if limit < 1 else 'above maximum'}"
                                     f" value. Expected a value {'>= 1' if limit < 1 else '<= 100'}, but got {limit}"
                                     " instead.", "limit", code)
            order = (qs.get("order") or ["desc"])[-1]
            if order not in ("asc", "desc"):
                return self._invalid(400, f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'.",
                                     "order", "invalid_value")
            after = (qs.get("after") or [None])[-1]
        step = self._take_step(rec)
        status = int(step.get("status", 200))
        if status != 200:
            return self._scripted_error(step, op, entry["model"], api_version)
        extra = {str(k): str(v) for k, v in (step.get("headers") or {}).items()}
        if "body" in step:
            return self._send_json(200, step["body"], extra)
        if op == "responses.retrieve":
            return self._send_json(200, s.current_response(entry), extra)
        if op == "responses.delete":
            with s.lock:
                entry["deleted"] = True
            obj = "response.deleted" if s.provider == OPENAI else "response"
            return self._send_json(200, {"id": entry["id"], "object": obj, "deleted": True}, extra)
        if op == "responses.cancel":
            if not entry["background"]:
                return self._invalid(400, "Cannot cancel a synchronous response.")
            cur = s.current_response(entry)
            if cur["status"] in ("queued", "in_progress"):
                with s.lock:
                    cur["status"] = "cancelled"
                    entry["response"], entry["final"] = copy.deepcopy(cur), None
            return self._send_json(200, cur, extra)
        # input_items
        items = list(entry["input_items"])
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = copy.deepcopy(items[:limit])
        return self._send_json(200, {"object": "list", "data": page,
                                     "first_id": page[0]["id"] if page else None,
                                     "last_id": page[-1]["id"] if page else None,
                                     "has_more": len(items) > limit}, extra)

    def _validate_responses(self, req: dict) -> bool:
        inp = req.get("input")
        if inp is None:
            self._invalid(400, "Missing required parameter: 'input'.", "input", "missing_required_parameter")
            return False
        if not isinstance(inp, (str, list)):
            self._invalid(400, "Invalid type for 'input': expected one of a string or array of input items, but got "
                          f"{_json_type(inp)} instead.", "input", "invalid_type")
            return False
        for i, item in enumerate(inp if isinstance(inp, list) else []):
            if not isinstance(item, dict):
                self._invalid(400, f"Invalid type for 'input[{i}]': expected an input item, but got "
                              f"{_json_type(item)} instead.", f"input[{i}]", "invalid_type")
                return False
            typ = item.get("type", "message")
            if not isinstance(typ, str):
                self._invalid(400, f"Invalid type for 'input[{i}].type': expected a string, but got "
                              f"{_json_type(typ)} instead.", f"input[{i}].type", "invalid_type")
                return False
            if typ != "message":
                continue
            role = item.get("role")
            if role is None:
                self._invalid(400, f"Missing required parameter: 'input[{i}].role'.", f"input[{i}].role",
                              "missing_required_parameter")
                return False
            if role not in ("user", "assistant", "system", "developer"):
                self._invalid(400, f"Invalid value: '{role}'. Supported values are: 'assistant', 'system', "
                              "'developer', and 'user'.", f"input[{i}].role", "invalid_value")
                return False
            if "content" not in item:
                self._invalid(400, f"Missing required parameter: 'input[{i}].content'.", f"input[{i}].content",
                              "missing_required_parameter")
                return False
            if not isinstance(item["content"], (str, list)):
                self._invalid(400, f"Invalid type for 'input[{i}].content': expected one of a string or array of "
                              f"input content, but got {_json_type(item['content'])} instead.",
                              f"input[{i}].content", "invalid_type")
                return False
        for key in ("stream", "store", "background", "parallel_tool_calls"):
            val = req.get(key)
            if val is not None and not isinstance(val, bool):
                self._invalid(400, f"Invalid type for '{key}': expected a boolean, but got {_json_type(val)} "
                              "instead.", key, "invalid_type")
                return False
        instructions = req.get("instructions")
        if instructions is not None and not isinstance(instructions, (str, list)):
            self._invalid(400, f"Invalid type for 'instructions': expected a string, but got "
                          f"{_json_type(instructions)} instead.", "instructions", "invalid_type")
            return False
        mot = req.get("max_output_tokens")
        if mot is not None:
            if isinstance(mot, bool) or not isinstance(mot, int):
                self._invalid(400, f"Invalid type for 'max_output_tokens': expected an integer, but got "
                              f"{_json_type(mot)} instead.", "max_output_tokens", "invalid_type")
                return False
            if mot < 16:
                self._invalid(400, f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                              f"16, but got {mot} instead.", "max_output_tokens", "integer_below_min_value")
                return False
        prev = req.get("previous_response_id")
        if prev is not None:
            if not isinstance(prev, str):
                self._invalid(400, f"Invalid type for 'previous_response_id': expected a string, but got "
                              f"{_json_type(prev)} instead.", "previous_response_id", "invalid_type")
                return False
            if not prev.startswith("resp"):
                self._invalid(400, f"Invalid 'previous_response_id': '{prev}'. Expected an ID that begins with "
                              "'resp'.", "previous_response_id", "invalid_value")
                return False
        return True

    def _response_object(self, req: dict, model: str, content: str, prev: dict | None) -> dict:
        """A completed Response with one assistant message; usage.input_tokens counts the input, the
        instructions and (as the real service bills it) the previous response's conversation."""
        now = _now()
        input_tokens = _approx_tokens(req.get("input")) + _approx_tokens(req.get("instructions"))
        if prev is not None:
            pu = (prev["final"] or prev["response"]).get("usage") or {}
            input_tokens += int(pu.get("total_tokens") or 0)
        output_tokens = len(content.split())
        text_cfg = req.get("text") if isinstance(req.get("text"), dict) else {}
        return {
            "id": _hex_id("resp_"),
            "object": "response",
            "created_at": now,
            "status": "completed",
            "background": req.get("background") is True,
            "completed_at": now,
            "error": None,
            "incomplete_details": None,
            "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "max_tool_calls": req.get("max_tool_calls"),
            "model": model,
            "output": [{
                "id": _hex_id("msg_"),
                "type": "message",
                "status": "completed",
                "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": content}],
                "role": "assistant",
            }],
            "parallel_tool_calls": req.get("parallel_tool_calls") is not False,
            "previous_response_id": req.get("previous_response_id"),
            "prompt_cache_key": req.get("prompt_cache_key"),
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": req.get("safety_identifier"),
            "service_tier": "default",
            "store": req.get("store") is not False,
            "temperature": req.get("temperature", 1.0),
            "text": {"format": {"type": "text"}, "verbosity": "medium", **text_cfg},
            "tool_choice": req.get("tool_choice", "auto"),
            "tools": req.get("tools") or [],
            "top_logprobs": req.get("top_logprobs", 0),
            "top_p": req.get("top_p", 1.0),
            "truncation": req.get("truncation", "disabled"),
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
            "user": req.get("user"),
            "metadata": req.get("metadata") or {},
        }

    @staticmethod
    def _input_items(inp) -> list[dict]:
        """The input as stored input items (what GET .../input_items lists), oldest first, with ids."""
        items = [{"type": "message", "role": "user", "content": inp}] if isinstance(inp, str) else inp
        out = []
        for item in items:
            it = copy.deepcopy(item)
            typ = it.setdefault("type", "message")
            if typ == "message":
                if isinstance(it.get("content"), str):
                    if it.get("role") == "assistant":
                        it["content"] = [{"type": "output_text", "text": it["content"], "annotations": []}]
                    else:
                        it["content"] = [{"type": "input_text", "text": it["content"]}]
                it.setdefault("status", "completed")
            it.setdefault("id", _hex_id("msg_" if typ == "message" else "item_"))
            out.append(it)
        return out

    @staticmethod
    def _response_events(final: dict) -> list[str]:
        """The SSE frames of a streamed text answer, `event:` + `data:` lines, sequence_number from 0."""
        frames: list[str] = []

        def ev(type_: str, **fields):
            obj = {"type": type_, "sequence_number": len(frames), **fields}
            frames.append(f"event: {type_}\ndata: {_sse_json(obj)}\n\n")

        msg = final["output"][0]
        text = msg["content"][0]["text"]
        pending = copy.deepcopy(final)
        pending.update({"status": "in_progress", "output": [], "usage": None, "completed_at": None})
        ids = {"item_id": msg["id"], "output_index": 0}
        ev("response.created", response=pending)
        ev("response.in_progress", response=pending)
        ev("response.output_item.added", output_index=0,
           item={"id": msg["id"], "type": "message", "status": "in_progress", "content": [], "role": "assistant"})
        ev("response.content_part.added", **ids, content_index=0,
           part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
        words = text.split(" ")
        for i, w in enumerate(words):
            ev("response.output_text.delta", **ids, content_index=0, delta=w if i == 0 else " " + w, logprobs=[])
        ev("response.output_text.done", **ids, content_index=0, text=text, logprobs=[])
        ev("response.content_part.done", **ids, content_index=0,
           part={"type": "output_text", "annotations": [], "logprobs": [], "text": text})
        ev("response.output_item.done", output_index=0, item=msg)
        ev("response.completed", response=final)
        return frames

    def _check_content_type(self) -> bool:
        """The APIs parse a body only when it is declared as JSON."""
        ct = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json")):
            return True
        if self.server.provider == OPENAI:
            self._invalid(400, f"Invalid Content-Type header ({ct or 'none'}), expected application/json. (HINT: "
                          "the body of this request was not read as JSON.)", None, "invalid_content_type")
        else:
            self._az_error(415, "UnsupportedMediaType", f"The content type '{ct or 'none'}' is not supported; "
                           "use 'application/json'.")
        return False

    def _parse_body(self, body: bytes):
        try:
            req = json.loads(body) if body.strip() else None
        except ValueError:
            req = None
            bad_json = True
        else:
            bad_json = False
        if bad_json or (body.strip() and not isinstance(req, dict)):
            self._invalid(400, "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                          "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
                          "sent was not valid JSON. If you have trouble figuring out how to fix this, please contact "
                          "us through our help center at help.openai.com.)")
            return None
        if req is None:
            self._invalid(400, "you must provide a model parameter" if self.server.provider == OPENAI
                          else "'messages' is a required property")
            return None
        return req

    def _validate_op(self, op: str, req: dict) -> bool:
        if op == "chat":
            msgs = req.get("messages")
            if msgs is None:
                self._invalid(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
                return False
            if not isinstance(msgs, list):
                self._invalid(400, f"Invalid type for 'messages': expected an array, but got "
                              f"{type(msgs).__name__} instead.", "messages", "invalid_type")
                return False
            if not msgs:
                self._invalid(400, "[] is too short - 'messages'", "messages", None)
                return False
            for i, msg in enumerate(msgs):
                if not isinstance(msg, dict) or msg.get("role") not in (
                        "system", "user", "assistant", "tool", "developer", "function"):
                    self._invalid(400, f"Invalid value for 'messages[{i}].role'.", f"messages[{i}].role",
                                  "invalid_value")
                    return False
        elif op == "completions":
            prompt = req.get("prompt")
            if prompt is None:
                self._invalid(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
                return False
            if not isinstance(prompt, (str, list)):
                self._invalid(400, "Invalid type for 'prompt'.", "prompt", "invalid_type")
                return False
        elif op == "embeddings":
            inp = req.get("input")
            if inp is None:
                self._invalid(400, "Missing required parameter: 'input'.", "input", "missing_required_parameter")
                return False
            if not isinstance(inp, (str, list)) or (isinstance(inp, list) and not inp):
                self._invalid(400, "'$.input' is invalid. Please check the API reference: "
                              "https://platform.openai.com/docs/api-reference.", "input", None)
                return False
            if req.get("stream"):
                self._invalid(400, "Unrecognized request argument supplied: stream", "stream", None)
                return False
        if "stream" in req and not isinstance(req["stream"], bool) and req["stream"] is not None:
            self._invalid(400, "Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
            return False
        return True

    # --- answers --------------------------------------------------------------------------------

    def _forced_step(self) -> dict | None:
        """x-mock-status (any mock) or x-mock-status-<name> (only the mock of that name)."""
        name = self.server.name
        hdr = f"x-mock-status-{name}"
        st = self.headers.get(hdr)
        if st is None:
            hdr = "x-mock-status"
            st = self.headers.get(hdr)
        if st is None:
            return None
        step: dict = {"_from": hdr}
        try:
            step["status"] = int(st)
        except ValueError:
            return None
        if self.headers.get("x-mock-retry-after") is not None:
            step["retry_after"] = self.headers["x-mock-retry-after"]
        if self.headers.get("x-mock-delay-ms") is not None:
            step["delay_ms"] = int(self.headers["x-mock-delay-ms"])
        count = self.headers.get("x-mock-count")
        if count is not None and count.strip().isdigit() and int(count) > 1:
            # this request and the next count-1 API requests (e.g. the gateway's retries, which
            # do not carry the header) get the same answer
            follow = {k: v for k, v in step.items() if k != "_from"}
            follow["_left"] = int(count) - 1
            with self.server.lock:
                self.server.script.insert(0, follow)
        return step

    def _take_step(self, rec) -> dict:
        """This request's scripted step (x-mock-status*, script, fail rate, x-mock-delay-ms), recorded;
        its delay is served and a close step resets the connection here."""
        s = self.server
        step = self._forced_step()
        if step is None:
            step = s.next_step()
        if step is None and self.headers.get("x-mock-delay-ms") is not None:
            step = {"delay_ms": int(self.headers["x-mock-delay-ms"]), "_from": "x-mock-delay-ms"}
        rec["step"] = step
        step = step or {}
        if step.get("delay_ms"):
            time.sleep(int(step["delay_ms"]) / 1000.0)
        if step.get("close"):
            self._abort()
        return step

    def _answer(self, rec, op, req, model, api_version, who, deployment):
        step = self._take_step(rec)
        status = int(step.get("status", 200))
        if status != 200:
            return self._scripted_error(step, op, model, api_version)
        extra = {str(k): str(v) for k, v in (step.get("headers") or {}).items()}
        if "body" in step:
            return self._send_json(200, step["body"], extra)
        content = f"Hello from {who}"
        if op == "embeddings":
            return self._send_json(200, self._embeddings(req, model), extra)
        if req.get("stream") is True:
            return self._stream(op, req, model, content, extra, step.get("close_after_events"))
        if op == "chat":
            return self._send_json(200, self._chat(req, model, content), extra)
        return self._send_json(200, self._completion(req, model, content), extra)

    def _usage(self, req, content):
        prompt = _approx_tokens(req.get("messages") if "messages" in req else req.get("prompt"))
        completion = len(content.split())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chat(self, req, model, content):
        s = self.server
        out = {
            "id": "chatcmpl-" + uuid.uuid4().hex[:29],
            "object": "chat.completion",
            "created": _now(),
            "model": model if s.provider == AZURE else req["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": self._usage(req, content),
            "system_fingerprint": "fp_mock0001",
        }
        if s.provider == AZURE:
            out["choices"][0]["content_filter_results"] = CONTENT_FILTER_OK
            out["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": CONTENT_FILTER_OK}]
        return out

    def _completion(self, req, model, content):
        s = self.server
        out = {
            "id": "cmpl-" + uuid.uuid4().hex[:29],
            "object": "text_completion",
            "created": _now(),
            "model": model if s.provider == AZURE else req["model"],
            "choices": [{"text": content, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": self._usage(req, content),
        }
        if s.provider == AZURE:
            out["choices"][0]["content_filter_results"] = CONTENT_FILTER_OK
        return out

    def _embeddings(self, req, model):
        s = self.server
        inp = req["input"]
        items = [inp] if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)) else inp
        dims = int(req.get("dimensions") or 8)
        dims = max(1, min(dims, 64))
        data = []
        for i, item in enumerate(items):
            seed = sum(ord(c) for c in json.dumps(item)) + i
            vec = [round(((seed * (j + 7)) % 1000) / 1000.0 - 0.5, 6) for j in range(dims)]
            if req.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            else:
                emb = vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = _approx_tokens(inp)
        return {
            "object": "list",
            "data": data,
            "model": model if s.provider == AZURE else req["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _stream(self, op, req, model, content, extra, close_after_events):
        s = self.server
        created = _now()
        resp_model = model if s.provider == AZURE else req["model"]
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        events: list[str] = []
        words = content.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        if op == "chat":
            cid = "chatcmpl-" + uuid.uuid4().hex[:29]

            def chunk(delta, finish=None, usage_field=False):
                c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": resp_model,
                     "system_fingerprint": "fp_mock0001",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                if s.provider == AZURE:
                    c["choices"][0]["content_filter_results"] = CONTENT_FILTER_OK if delta.get("content") else {}
                if include_usage:
                    c["usage"] = None
                return c

            if s.provider == AZURE:
                # Azure's first event carries the prompt filter results and no choices.
                events.append(_sse_json({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                                          "prompt_filter_results": [{"prompt_index": 0,
                                                                     "content_filter_results": CONTENT_FILTER_OK}]}))
            events.append(_sse_json(chunk({"role": "assistant", "content": "", "refusal": None})))
            for p in pieces:
                events.append(_sse_json(chunk({"content": p})))
            events.append(_sse_json(chunk({}, "stop")))
            if include_usage:
                last = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": resp_model,
                        "system_fingerprint": "fp_mock0001", "choices": [], "usage": self._usage(req, content)}
                if s.provider == AZURE:
                    last["latency_checkpoint"] = AZURE_LATENCY_CHECKPOINT
                events.append(_sse_json(last))
        else:
            cid = "cmpl-" + uuid.uuid4().hex[:29]
            for i, p in enumerate(pieces):
                events.append(_sse_json({"id": cid, "object": "text_completion", "created": created,
                                          "model": resp_model, "choices": [
                                              {"text": p, "index": 0, "logprobs": None,
                                               "finish_reason": "stop" if i == len(pieces) - 1 else None}]}))
            if include_usage:
                events.append(_sse_json({"id": cid, "object": "text_completion", "created": created,
                                          "model": resp_model, "choices": [], "usage": self._usage(req, content)}))
        events.append("[DONE]")
        self._send_sse([f"data: {ev}\n\n" for ev in events], extra, close_after_events)

    def _send_sse(self, frames: list[str], extra: dict, close_after_events):
        """200 text/event-stream, one SSE event per HTTP chunk, stream_delay_ms apart (never gzipped);
        close_after_events=N resets the connection after N events."""
        s = self.server
        headers = self._base_headers()
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        headers["Transfer-Encoding"] = "chunked"
        headers.update(extra)
        self._set_status(200)
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()
        delay = s.stream_delay_ms / 1000.0
        for i, frame in enumerate(frames):
            if close_after_events is not None and i >= int(close_after_events):
                self._abort()
            if i > 0 and delay > 0:
                time.sleep(delay)
            data = frame.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _sse_json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


# ----------------------------------------------------------------------------------------------
# Entry points


def start(provider: str, port: int = 0, **opts):
    """Start a mock upstream in a background thread. Returns (server, thread); server.port is the port.

    opts: api_key, host ("*" disables the Host check), resource, api_versions, deployments
    ("dep" or "dep=model", list or comma string), ad_token, stream_delay_ms, tls_cert, tls_key,
    expect_sni, name (label used in answers: "Hello from mock <name>..."), forbid (secrets that
    must never arrive), models (openai: accepted models), region, bind, quiet,
    entra_token_secret (azure: also accept Bearer tokens minted by tests/mocks/entra.py with this
    HMAC secret, until they expire), responses_api_versions (azure: the api-versions the
    deployments-style Responses API accepts; default 2025-03-01-preview and later + "preview"),
    background_delay_ms (Responses "background": true answers complete this late, default 0),
    max_stored_responses (response ids remembered, default 10000).
    Stop with server.stop().
    """
    return serve_in_thread(MockServer(provider, port, **opts))


def main(argv=None):
    p = argparse.ArgumentParser(description="Strict mock OpenAI / Azure OpenAI upstream")
    p.add_argument("--provider", choices=[OPENAI, AZURE], required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--api-key")
    p.add_argument("--ad-token", help="azure: also accept Authorization: Bearer <token>")
    p.add_argument("--entra-token-secret", help="azure: accept Bearer tokens minted by tests/mocks/entra.py with "
                                                "this HMAC secret until they expire")
    p.add_argument("--responses-api-versions", help="azure: api-versions of /openai/responses (default: "
                                                    "2025-03-01-preview and later, preview)")
    p.add_argument("--host", help="expected Host header ('*' = any)")
    p.add_argument("--resource", help="azure resource name (host <resource>.openai.azure.com)")
    p.add_argument("--api-versions", help="azure: comma-separated supported api-versions")
    p.add_argument("--deployments", help="azure: comma-separated deployments, each 'name' or 'name=model'")
    p.add_argument("--models", help="openai: comma-separated accepted models (default: any)")
    p.add_argument("--name", help="label used in answers and logs (default: the provider)")
    p.add_argument("--region", default="eastus")
    p.add_argument("--forbid", help="comma-separated secrets that must never reach this upstream")
    p.add_argument("--stream-delay-ms", type=int, default=DEFAULT_STREAM_DELAY_MS)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--expect-sni", help="with TLS: fail handshakes whose SNI is not this name")
    p.add_argument("--quiet", action="store_true", help="do not log each request to stderr")
    a = p.parse_args(argv)
    if a.tls_cert and not a.tls_key:
        p.error("--tls-cert needs --tls-key")
    server = MockServer(a.provider, a.port, api_key=a.api_key, host=a.host, resource=a.resource,
                        api_versions=a.api_versions, deployments=a.deployments, ad_token=a.ad_token,
                        stream_delay_ms=a.stream_delay_ms, tls_cert=a.tls_cert, tls_key=a.tls_key,
                        expect_sni=a.expect_sni, name=a.name, forbid=a.forbid, models=a.models,
                        region=a.region, bind=a.bind, quiet=a.quiet, entra_token_secret=a.entra_token_secret,
                        responses_api_versions=a.responses_api_versions)
    extra = ""
    if a.provider == AZURE:
        extra = f" resource={server.resource} api-versions={','.join(server.api_versions)} " \
                f"deployments={','.join(server.deployments)}"
    return serve_until_signalled(
        server, f"mock {server.name} ({a.provider}) listening on {server.url} host={server.expected_host}{extra}")


if __name__ == "__main__":
    sys.exit(main())
