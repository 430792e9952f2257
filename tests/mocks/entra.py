#!/usr/bin/env python3
"""Strict mock Microsoft Entra ID token endpoint and Azure IMDS managed-identity endpoint (stdlib only).

One server answers both (SPEC.md section 2c); the path says which one a request is for, and each
has its own Host check. Point the filter's `entra` and `imds` clusters at the same port, or start
two instances when a test wants their scripts and counters apart.

    python tests/mocks/entra.py --port 18003 --tenant-id <tenant> --client-id <id> --client-secret <secret> \\
        --token-secret <hmac secret shared with the Azure mock> --token-lifetime-s 3599

or in-process from pytest::

    from mocks.entra import start
    server, thread = start(port=0, token_secret="s3cret", token_lifetime_s=3)
    server.stop()

(tests/harness.py: ``start_entra_mock(**opts) -> EntraClient``.)

Endpoints
    POST /<tenant_id>/oauth2/v2.0/token          client credentials, Host login.microsoftonline.com
        Content-Type application/x-www-form-urlencoded (anything else: the body is not read, so
        grant_type is missing, as with the real service); fields checked exactly:
        grant_type=client_credentials, client_id, client_secret,
        scope=https://cognitiveservices.azure.com/.default. Errors in Entra's JSON shape
        {"error", "error_description": "AADSTS...: ...", "error_codes", "timestamp", "trace_id",
        "correlation_id", "error_uri"}:
            400 invalid_request         AADSTS90002 unknown tenant, AADSTS900144 missing field,
                                        AADSTS900561 not a POST, AADSTS9000411 duplicated field
            400 unsupported_grant_type  AADSTS70003
            400 unauthorized_client     AADSTS700016 unknown client_id
            400 invalid_scope           AADSTS1002012 scope without the /.default suffix
            400 invalid_resource        AADSTS500011 a /.default scope of another resource
            401 invalid_client          AADSTS7000215 wrong secret, AADSTS7000216 no secret
        200 {"token_type": "Bearer", "expires_in": <int>, "ext_expires_in": <int>, "access_token"}
    GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://cognitiveservices.azure.com
        [&client_id=<user-assigned identity>]        managed identity (IMDS), Host 169.254.169.254
        header "Metadata: true" (exactly, lower case) required: else 400
        {"error": "invalid_request", "error_description": "Required metadata header not specified"};
        X-Forwarded-For present: 400 (IMDS refuses proxied requests); api-version and resource checked
        exactly (missing/other: 400 invalid_request / invalid_resource); unknown client_id: 400
        "Identity not found". 200 {"access_token", "client_id", "expires_in": "<secs STRING>",
        "expires_on": "<unix secs string>", "ext_expires_in", "not_before", "resource", "token_type"}.
    Any other path: 404.

Tokens are JWT-shaped (HS256) and signed with token_secret (upstream.mint_entra_token): the Azure mock
started with ``entra_token_secret=<same secret>`` accepts them as ``Authorization: Bearer`` until they
expire (exactly: the payload carries exp_ms), then answers 401 in Azure's shape. Secrets (client
secrets, tokens) are never echoed in an error body, and are masked in the request log.

Control API (same port, no auth, no host check):

    POST /__mock/script     JSON list of steps applied to the next valid token requests (either endpoint), in order:
                            {"status": 500} / {"status": 503} / {"status": 429, "retry_after": "2"} /
                            {"status": 400} / {"status": 401}        an error in that endpoint's shape
                            {"delay_ms": 3000}                       success, answered late
                            {"close": true}                          reset the connection, no answer
                            {"expires_in": 5}                        success whose token lives (and says) 5 s
                            {} or {"status": 200}                    a normal answer
                            optional on any step: "repeat": N | "forever", "delay_ms": N,
                            "headers": {...}, "body": {...} (replaces the answer's JSON body)
                            {"append": true, "steps": [...]} appends instead of replacing.
                            Invalid requests keep their own 4xx and consume no step.
    POST /__mock/config     {"token_lifetime_s": 3}   lifetime (and expires_in) of the tokens minted from now on
    POST /__mock/mint       {"lifetime_s": 3} -> {"access_token", "exp_ms", "jti"}: a token without a request
    POST /__mock/forbid     {"secrets": ["..."]}  strings that must never reach this mock
    POST /__mock/reset      clears script, request log, leaks and issued tokens (settings stay)
    GET  /__mock/requests   every token request received: seq, time, method, path, raw_path, query,
                            headers, endpoint ("entra" | "imds" | None), tenant, form (fields; client_secret
                            masked), client_secret_ok (True/False/None), status, error (the error code
                            answered), step, closed, token_jti / token_exp_ms (issued), duration_ms
    GET  /__mock/tokens     tokens issued (jti, endpoint, client_id, exp_ms; never the token itself)
    GET  /__mock/leaks      secrets in a URL, forbidden secrets
    GET  /__mock/state      counters and settings
    GET  /__mock/health     200 {"ok": true}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import parse_qs

try:
    from .base import (ScriptedHandler, ScriptedServer, mask_key, serve_in_thread, serve_until_signalled,
                       split_list)
    from .upstream import COGNITIVE_RESOURCE, mint_entra_token
except ImportError:  # run as a script: python tests/mocks/entra.py
    from base import (ScriptedHandler, ScriptedServer, mask_key, serve_in_thread, serve_until_signalled,
                      split_list)
    from upstream import COGNITIVE_RESOURCE, mint_entra_token

ENTRA = "entra"
IMDS = "imds"

DEFAULT_TENANT_ID = "00000000-0000-4000-8000-00000000a11e"
DEFAULT_CLIENT_ID = "11111111-1111-4111-8111-111111111111"
DEFAULT_CLIENT_SECRET = "llmf~local-entra-mock-client-secret"
DEFAULT_TOKEN_SECRET = "llmf-local-entra-token-hmac-secret"
DEFAULT_MI_CLIENT_ID = "22222222-2222-4222-8222-222222222222"  # the system-assigned identity
DEFAULT_USER_ASSIGNED = ("33333333-3333-4333-8333-333333333333",)
DEFAULT_TOKEN_LIFETIME_S = 3599
DEFAULT_LOGIN_HOST = "login.microsoftonline.com"
DEFAULT_IMDS_HOST = "169.254.169.254"
DEFAULT_IMDS_API_VERSIONS = ("2018-02-01",)
COGNITIVE_SCOPE = COGNITIVE_RESOURCE + "/.default"
IMDS_PATH = "/metadata/identity/oauth2/token"
FORM = "application/x-www-form-urlencoded"


def _entra_timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


class EntraMockServer(ScriptedServer):
    request_queue_size = 64

    def __init__(
        self,
        port: int = 0,
        *,
        tenant_id=None,
        client_id: str | None = None,
        client_secret: str | None = None,
        clients: dict | None = None,
        token_secret: str | None = None,
        token_lifetime_s: float = DEFAULT_TOKEN_LIFETIME_S,
        login_host: str | None = None,
        imds_host: str | None = None,
        imds_api_versions=None,
        mi_client_id: str | None = None,
        user_assigned=None,
        name: str = "entra",
        forbid=None,
        bind: str = "127.0.0.1",
        quiet: bool = True,
    ):
        self.provider = "entra"
        self.name = name
        self.tenants = split_list(tenant_id) or [DEFAULT_TENANT_ID]
        self.clients: dict[str, str] = {client_id or DEFAULT_CLIENT_ID: client_secret or DEFAULT_CLIENT_SECRET}
        self.clients.update({str(k): str(v) for k, v in (clients or {}).items()})
        self.token_secret = token_secret or DEFAULT_TOKEN_SECRET
        self.token_lifetime_s = float(token_lifetime_s)
        self.login_host = login_host or DEFAULT_LOGIN_HOST
        self.imds_host = imds_host or DEFAULT_IMDS_HOST
        self.imds_api_versions = split_list(imds_api_versions) or list(DEFAULT_IMDS_API_VERSIONS)
        self.mi_client_id = mi_client_id or DEFAULT_MI_CLIENT_ID
        ua = DEFAULT_USER_ASSIGNED if user_assigned is None else split_list(user_assigned)
        self.user_assigned = list(ua)
        self.forbidden = split_list(forbid)
        self.quiet = quiet

        self._init_state()
        self.tokens: list[dict] = []
        super().__init__((bind, port), EntraHandler)
        self.port = self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- secrets -------------------------------------------------------------------------------

    def secrets(self) -> list[str]:
        return [v for v in list(self.clients.values()) + [self.token_secret] + self.forbidden if v]

    def scrub(self, text: str, extra=()) -> str:
        """Every known secret (and the ones a request carried) masked in text."""
        for secret in sorted(set(self.secrets()) | {e for e in extra if e}, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, mask_key(secret))
        return text

    # -- script and tokens ---------------------------------------------------------------------

    def mint(self, endpoint: str, lifetime_s: float | None = None, claims: dict | None = None) -> dict:
        lifetime = self.token_lifetime_s if lifetime_s is None else float(lifetime_s)
        tok = mint_entra_token(self.token_secret, lifetime, claims)
        with self.lock:
            self.tokens.append({"jti": tok["jti"], "endpoint": endpoint, "exp_ms": tok["exp_ms"],
                                "issued_ms": int(time.time() * 1000), "client_id": (claims or {}).get("appid"),
                                "tenant": (claims or {}).get("tid")})
        return tok

    def reset(self):
        with self.lock:
            self.script = []
            self.log = []
            self.leaks = []
            self.tokens = []
            self._seq = 0

    def state(self) -> dict:
        with self.lock:
            per = {ENTRA: 0, IMDS: 0}
            for r in self.log:
                if r["endpoint"] in per:
                    per[r["endpoint"]] += 1
            return {
                "provider": self.provider, "name": self.name, "port": self.port,
                "tenants": list(self.tenants), "client_ids": list(self.clients),
                "login_host": self.login_host, "imds_host": self.imds_host,
                "imds_api_versions": list(self.imds_api_versions), "mi_client_id": self.mi_client_id,
                "user_assigned": list(self.user_assigned), "token_lifetime_s": self.token_lifetime_s,
                "script": [dict(s) for s in self.script], "requests": len(self.log), "requests_by_endpoint": per,
                "tokens_issued": len(self.tokens), "leaks": len(self.leaks),
            }

    def _views(self) -> dict:
        return {"/__mock/tokens": lambda: self.tokens}

    def _set(self, path: str, data) -> tuple[int, object] | None:
        if path == "/__mock/config":
            data = data or {}
            unknown = set(data) - {"token_lifetime_s"}
            if unknown:
                raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
            if "token_lifetime_s" in data:
                lifetime = float(data["token_lifetime_s"])
                if lifetime <= 0:
                    raise ValueError("token_lifetime_s must be > 0")
                with self.lock:
                    self.token_lifetime_s = lifetime
            return (200, self.state())
        if path == "/__mock/mint":
            data = data or {}
            tok = self.mint("control", data.get("lifetime_s"), {"tid": self.tenants[0], "appid": "mock-control"})
            return (200, {"access_token": tok["access_token"], "exp_ms": tok["exp_ms"], "jti": tok["jti"]})
        return None


class EntraHandler(ScriptedHandler):
    server: EntraMockServer

    def version_string(self):
        return "Microsoft-IIS/10.0"

    def _send(self, status: int, obj, headers: dict | None = None):
        body = json.dumps(obj, separators=(",", ":")).encode()
        self._set_status(status)
        self.send_response(status)
        base = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store, no-cache",
                "Pragma": "no-cache", "x-ms-request-id": str(uuid.uuid4()), "x-mock-provider": self.server.name}
        if self._endpoint == IMDS:
            base = {"Content-Type": "application/json; charset=utf-8", "Server": "IMDS/150.870.65.1544",
                    "x-ms-request-id": str(uuid.uuid4()), "x-mock-provider": self.server.name}
        base.update({str(k): str(v) for k, v in (headers or {}).items()})
        base["Content-Length"] = str(len(body))
        for k, v in base.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _begin(self):
        super()._begin()
        self._endpoint = None
        self._carried: list[str] = []  # secret values this request carried (scrubbed from any answer)

    # --- recording (secrets masked) -----------------------------------------------------------

    def _record(self, split, body: bytes) -> dict:
        s = self.server
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        text = body.decode("utf-8", errors="replace")
        form = None
        if ctype == FORM:
            form = {}
            for k, vals in parse_qs(text, keep_blank_values=True).items():
                form[k] = vals[-1] if len(vals) == 1 else vals
            secret = form.get("client_secret")
            for v in (secret if isinstance(secret, list) else [secret]):
                if isinstance(v, str):
                    self._carried.append(v)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self._carried += [v for k, v in query.items() if k == "client_secret"]
        auth = self.headers.get("Authorization")
        if auth:
            self._carried.append(auth.split(" ", 1)[-1])

        def scrub(value):
            if isinstance(value, str):
                return s.scrub(value, self._carried)
            if isinstance(value, list):
                return [scrub(v) for v in value]
            if isinstance(value, dict):
                return {k: scrub(v) for k, v in value.items()}
            return value

        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        if form is not None and "client_secret" in form:
            sec = form["client_secret"]
            form["client_secret"] = [mask_key(x) for x in sec] if isinstance(sec, list) else mask_key(sec)
        with s.lock:
            s._seq += 1
            rec = {
                "seq": s._seq, "time": time.time(), "method": self.command, "path": split.path,
                "raw_path": scrub(self.path), "query": scrub(query), "headers": scrub(headers),
                "content_type": ctype or None, "form": scrub(form), "body": scrub(text) if text else None,
                "body_bytes": len(body), "endpoint": None, "tenant": None, "client_id": None,
                "client_secret_ok": None, "status": None, "error": None, "step": None, "closed": False,
                "token_jti": None, "token_exp_ms": None, "leak": False, "leak_reasons": [], "mock": s.name,
            }
            s.log.append(rec)
        # leaks: a client secret in the URL (proxies and access logs keep URLs), forbidden secrets
        reasons = []
        if "client_secret" in query:
            reasons.append("client_secret sent in the URL query string")
        blob = "\n".join(f"{k}: {v}" for k, v in self.headers.items()) + "\n" + self.path + "\n" + text
        for i, secret in enumerate(s.forbidden):
            if secret and secret in blob:
                reasons.append(f"forbidden secret #{i} ({mask_key(secret)}) reached {s.name}")
        if reasons:
            with s.lock:
                rec["leak"] = True
                rec["leak_reasons"] = reasons
                s.leaks.append({"seq": rec["seq"], "reason": "; ".join(reasons), "reasons": reasons,
                                "method": rec["method"], "path": rec["raw_path"], "mock": s.name})
        return rec

    # --- errors -------------------------------------------------------------------------------

    def _entra_error(self, status: int, error: str, aadsts: int, message: str, headers=None):
        """Entra's OAuth error JSON; the description never carries a secret."""
        rec = self._rec
        trace, corr, ts = str(uuid.uuid4()), str(uuid.uuid4()), _entra_timestamp()
        desc = self.server.scrub(f"AADSTS{aadsts}: {message} Trace ID: {trace} Correlation ID: {corr} "
                                 f"Timestamp: {ts}", self._carried)
        if rec is not None:
            rec["error"] = error
        return self._send(status, {"error": error, "error_description": desc, "error_codes": [aadsts],
                                   "timestamp": ts, "trace_id": trace, "correlation_id": corr,
                                   "error_uri": f"https://{self.server.login_host}/error?code={aadsts}"}, headers)

    def _imds_error(self, status: int, error: str, description: str, headers=None):
        if self._rec is not None:
            self._rec["error"] = error
        return self._send(status, {"error": error,
                                   "error_description": self.server.scrub(description, self._carried)}, headers)

    def _host_ok(self, expected: str) -> bool:
        if expected == "*":
            return True
        host = (self.headers.get("Host") or "").strip()
        hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if hostname.lower() == expected.lower():
            return True
        self._rec["host_mismatch"] = True
        self._send(421, {"error": "misdirected_request",
                         "error_description": f"Misdirected request: this is the mock of {expected}, but the Host "
                                              f"header is {host!r}"})
        return False

    # --- endpoints ----------------------------------------------------------------------------

    def _handle(self, rec, split, body: bytes):
        path = split.path
        parts = path.split("/")
        if path == IMDS_PATH:
            self._endpoint = rec["endpoint"] = IMDS
            if not self._host_ok(self.server.imds_host):
                return
            return self._imds(rec, split.query)
        if len(parts) == 5 and parts[0] == "" and parts[1] and parts[2:] == ["oauth2", "v2.0", "token"]:
            self._endpoint = rec["endpoint"] = ENTRA
            if not self._host_ok(self.server.login_host):
                return
            return self._client_credentials(rec, parts[1], body)
        return self._send(404, {"error": "not_found", "error_description": f"No such endpoint: {path}"})

    def _step(self, rec) -> dict | None:
        """The scripted step for a valid request: None when it answered (an error) itself."""
        step = self.server.next_step()
        rec["step"] = step
        step = step or {}
        if step.get("delay_ms"):
            time.sleep(int(step["delay_ms"]) / 1000.0)
        if step.get("close"):
            self._abort()
        status = int(step.get("status", 200))
        headers = {str(k): str(v) for k, v in (step.get("headers") or {}).items()}
        if step.get("retry_after") is not None:
            headers["Retry-After"] = str(step["retry_after"])
        if status != 200:
            if "body" in step:
                self._send(status, step["body"], headers)
            elif self._endpoint == ENTRA:
                code, err, msg = {
                    400: (90014, "invalid_request", "Mock scripted 400."),
                    401: (7000215, "invalid_client", "Invalid client secret provided."),
                    429: (50196, "temporarily_unavailable", "The server terminated an operation because it "
                                                            "encountered a client request loop."),
                    503: (90033, "temporarily_unavailable", "A transient error has occurred. Please try again."),
                }.get(status, (50000, "server_error", "There was an error issuing a token or an internal server "
                                                      "error occurred."))
                self._entra_error(status, err, code, msg, headers)
            else:
                err, msg = {
                    400: ("invalid_request", "Mock scripted 400."),
                    401: ("unauthorized_client", "Mock scripted 401."),
                    429: ("too_many_requests", "Too many requests"),
                    503: ("service_unavailable", "The service is temporarily unavailable. Please try again."),
                }.get(status, ("unknown", "Failed to retrieve token from the Active directory."))
                self._imds_error(status, err, msg, headers)
            return None
        step["_headers"] = headers
        return step

    def _client_credentials(self, rec, tenant: str, body: bytes):
        s = self.server
        rec["tenant"] = tenant
        if tenant not in s.tenants:
            return self._entra_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found. Check to make "
                                     "sure you have the correct tenant ID and are signing into the correct cloud. "
                                     "Check with your subscription administrator, this may happen if there are no "
                                     "active subscriptions for the tenant.")
        if self.command != "POST":
            return self._entra_error(400, "invalid_request", 900561, "The endpoint only accepts POST, OPTIONS "
                                     f"requests. Received a {self.command} request.")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        raw = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True) if ctype == FORM else {}
        for k, vals in raw.items():
            if len(vals) > 1:
                return self._entra_error(400, "invalid_request", 9000411, "The request is not properly "
                                         f"formatted. The parameter '{k}' is duplicated.")
        form = {k: v[0] for k, v in raw.items()}
        for field in ("grant_type",):
            if not form.get(field):
                return self._entra_error(400, "invalid_request", 900144, "The request body must contain the "
                                         f"following parameter: '{field}'.")
        if form["grant_type"] != "client_credentials":
            return self._entra_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported "
                                     f"grant type '{form['grant_type']}'.")
        for field in ("client_id", "scope"):
            if not form.get(field):
                return self._entra_error(400, "invalid_request", 900144, "The request body must contain the "
                                         f"following parameter: '{field}'.")
        client_id = rec["client_id"] = form["client_id"]
        if client_id not in s.clients:
            return self._entra_error(400, "unauthorized_client", 700016, f"Application with identifier "
                                     f"'{client_id}' was not found in the directory '{tenant}'. This can happen if "
                                     "the application has not been installed by the administrator of the tenant or "
                                     "consented to by any user in the tenant. You may have sent your authentication "
                                     "request to the wrong tenant.")
        secret = form.get("client_secret")
        if not secret:
            rec["client_secret_ok"] = False
            return self._entra_error(401, "invalid_client", 7000216, "'client_assertion', 'client_secret' or "
                                     "'request' is required for the 'client_credentials' grant type.")
        rec["client_secret_ok"] = secret == s.clients[client_id]
        if not rec["client_secret_ok"]:
            return self._entra_error(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the "
                                     "secret being sent in the request is the client secret value, not the client "
                                     f"secret ID, for a secret added to app '{client_id}'.")
        scope = form["scope"]
        if scope != COGNITIVE_SCOPE:
            if scope.endswith("/.default"):
                return self._entra_error(400, "invalid_resource", 500011, "The resource principal named "
                                         f"{scope[:-len('/.default')]} was not found in the tenant named {tenant}. "
                                         "This can happen if the application has not been installed by the "
                                         "administrator of the tenant or consented to by any user in the tenant. "
                                         "You might have sent your authentication request to the wrong tenant.")
            return self._entra_error(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not "
                                     "valid. Client credential flows must have a scope value with /.default "
                                     "suffixed to the resource identifier (application ID URI).")
        step = self._step(rec)
        if step is None:
            return
        lifetime = float(step["expires_in"]) if step.get("expires_in") is not None else s.token_lifetime_s
        tok = s.mint(ENTRA, lifetime, {"tid": tenant, "appid": client_id, "oid": str(uuid.uuid5(
            uuid.NAMESPACE_URL, client_id)), "iss": f"https://sts.windows.net/{tenant}/"})
        rec["token_jti"], rec["token_exp_ms"] = tok["jti"], tok["exp_ms"]
        expires_in = max(1, int(round(lifetime)))
        answer = step["body"] if "body" in step else {"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in,
                                      "access_token": tok["access_token"]}
        return self._send(200, answer, step["_headers"])

    def _imds(self, rec, query: str):
        s = self.server
        if self.command != "GET":
            return self._imds_error(405, "invalid_request", f"The request method {self.command} is not allowed.")
        if self.headers.get("Metadata") != "true":
            return self._imds_error(400, "invalid_request", "Required metadata header not specified")
        if self.headers.get("X-Forwarded-For") is not None:
            return self._imds_error(400, "invalid_request", "Request contains an X-Forwarded-For header; IMDS "
                                    "requests must not be proxied")
        qs = parse_qs(query, keep_blank_values=True)
        q = {k: v[-1] for k, v in qs.items()}
        version = q.get("api-version")
        if not version:
            return self._imds_error(400, "invalid_request", "Required query variable 'api-version' is missing")
        if version not in s.imds_api_versions:
            return self._imds_error(400, "invalid_request", f"Invalid api-version '{version}'")
        resource = q.get("resource")
        if not resource:
            return self._imds_error(400, "invalid_request", "Required audience parameter not specified")
        if resource != COGNITIVE_RESOURCE:
            return self._imds_error(400, "invalid_resource", f"AADSTS500011: The resource principal named "
                                    f"{resource} was not found in the tenant named {s.tenants[0]}.")
        client_id = q.get("client_id")
        if client_id is not None and client_id not in s.user_assigned:
            return self._imds_error(400, "invalid_request", "Identity not found")
        rec["client_id"] = client_id or s.mi_client_id
        step = self._step(rec)
        if step is None:
            return
        lifetime = float(step["expires_in"]) if step.get("expires_in") is not None else s.token_lifetime_s
        tok = s.mint(IMDS, lifetime, {"tid": s.tenants[0], "appid": rec["client_id"],
                                      "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, rec["client_id"])),
                                      "xms_mirid": "/subscriptions/mock/providers/Microsoft.Compute/vm"})
        rec["token_jti"], rec["token_exp_ms"] = tok["jti"], tok["exp_ms"]
        now = int(time.time())
        expires_in = max(1, int(round(lifetime)))
        answer = step["body"] if "body" in step else {
            "access_token": tok["access_token"], "client_id": rec["client_id"], "expires_in": str(expires_in),
            "expires_on": str(tok["exp_ms"] // 1000), "ext_expires_in": str(expires_in), "not_before": str(now),
            "resource": COGNITIVE_RESOURCE, "token_type": "Bearer"}
        return self._send(200, answer, step["_headers"])


# ----------------------------------------------------------------------------------------------
# Entry points


def start(port: int = 0, **opts):
    """Start the Entra/IMDS mock in a background thread: (server, thread); server.port is the port.

    opts: tenant_id (one or a list/comma string), client_id, client_secret, clients ({id: secret}
    more apps), token_secret (HMAC secret shared with the Azure mock's entra_token_secret),
    token_lifetime_s, login_host / imds_host ("*" disables the Host check), imds_api_versions,
    mi_client_id (system-assigned identity), user_assigned (client ids), name, forbid, bind, quiet.
    """
    return serve_in_thread(EntraMockServer(port, **opts))


def main(argv=None):
    p = argparse.ArgumentParser(description="Strict mock Entra ID token endpoint and IMDS")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--tenant-id", help="comma-separated tenant ids (default: one local tenant)")
    p.add_argument("--client-id")
    p.add_argument("--client-secret")
    p.add_argument("--token-secret", help="HMAC secret shared with the Azure mock (--entra-token-secret)")
    p.add_argument("--token-lifetime-s", type=float, default=DEFAULT_TOKEN_LIFETIME_S)
    p.add_argument("--login-host", help="expected Host of the token endpoint ('*' = any)")
    p.add_argument("--imds-host", help="expected Host of IMDS ('*' = any)")
    p.add_argument("--imds-api-versions", help="comma-separated accepted IMDS api-versions")
    p.add_argument("--user-assigned", help="comma-separated user-assigned identity client ids")
    p.add_argument("--name", default="entra")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    server = EntraMockServer(a.port, tenant_id=a.tenant_id, client_id=a.client_id, client_secret=a.client_secret,
                             token_secret=a.token_secret, token_lifetime_s=a.token_lifetime_s,
                             login_host=a.login_host, imds_host=a.imds_host, imds_api_versions=a.imds_api_versions,
                             user_assigned=a.user_assigned, name=a.name, bind=a.bind, quiet=a.quiet)
    return serve_until_signalled(
        server, f"mock {server.name} (entra+imds) listening on {server.url} login_host={server.login_host} "
        f"imds_host={server.imds_host} tenants={','.join(server.tenants)}")


if __name__ == "__main__":
    sys.exit(main())
