"""Fast tests of the Entra ID / IMDS token mock (tests/mocks/entra.py) and of the Azure mock's check of
the tokens it mints (no Envoy): form encoding, exact fields, error shapes, Metadata header, expires_in
types, expiry enforced, scripting, secrets never echoed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from harness import AZURE_KEY, REPO_ROOT, start_entra_mock, wait_for_port
from mocks import entra as E
from mocks.upstream import mint_entra_token, verify_entra_token

T = 10  # seconds, every HTTP call
TOKEN_SECRET = "test-entra-hmac-secret"
LOGIN = {"Host": "login.microsoftonline.com"}
IMDS = {"Host": "169.254.169.254", "Metadata": "true"}
AZURE_HOST = {"Host": "llmf-local.openai.azure.com"}
FORM = {"grant_type": "client_credentials", "client_id": E.DEFAULT_CLIENT_ID,
        "client_secret": E.DEFAULT_CLIENT_SECRET, "scope": "https://cognitiveservices.azure.com/.default"}
IMDS_QUERY = "api-version=2018-02-01&resource=https://cognitiveservices.azure.com"
USER_ASSIGNED = E.DEFAULT_USER_ASSIGNED[0]
CHAT_PATH = "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def _entra_server():
    m = start_entra_mock(token_secret=TOKEN_SECRET)
    yield m
    m.stop()


@pytest.fixture
def entra(_entra_server):
    _entra_server.reset()
    _entra_server.set_token_lifetime(E.DEFAULT_TOKEN_LIFETIME_S)
    yield _entra_server
    leaks = _entra_server.leaks()
    _entra_server.reset()
    assert not leaks, f"leaks reached the Entra mock: {leaks}"


@pytest.fixture
def azure_entra(mock_factory):
    """An Azure mock that accepts the Entra mock's tokens (shared HMAC secret)."""
    return mock_factory("azure", name="azure-entra", entra_token_secret=TOKEN_SECRET)


def token_url(mock, tenant=E.DEFAULT_TENANT_ID):
    return mock.url(f"/{tenant}/oauth2/v2.0/token")


def client_credentials(mock, form=None, tenant=E.DEFAULT_TENANT_ID, headers=None, **kw):
    """POST the form (urlencoded by requests) to the token endpoint."""
    return requests.post(token_url(mock, tenant), data=FORM if form is None else form,
                         headers={**LOGIN, **(headers or {})}, timeout=T, **kw)


def imds(mock, query=IMDS_QUERY, headers=None, method="GET"):
    h = {**IMDS, **(headers or {})}
    h = {k: v for k, v in h.items() if v is not None}
    return requests.request(method, mock.url(f"{E.IMDS_PATH}?{query}"), headers=h, timeout=T)


def azure_chat(mock, token):
    return requests.post(mock.url(CHAT_PATH), json=CHAT, timeout=T,
                         headers={**AZURE_HOST, "Authorization": f"Bearer {token}"})


def assert_entra_error(r, status, error, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_description", "error_codes", "timestamp", "trace_id", "correlation_id",
                         "error_uri"}
    assert body["error"] == error and body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert f"Trace ID: {body['trace_id']}" in body["error_description"]
    assert E.DEFAULT_CLIENT_SECRET not in r.text and TOKEN_SECRET not in r.text


# ----------------------------------------------------------------------------------------------
# client credentials


def test_client_credentials_success_shape_and_record(entra):
    r = client_credentials(entra)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    assert body["token_type"] == "Bearer"
    assert type(body["expires_in"]) is int and body["expires_in"] == 3599 and type(body["ext_expires_in"]) is int
    assert r.headers["Content-Type"].startswith("application/json") and "no-store" in r.headers["Cache-Control"]
    verdict, claims = verify_entra_token(TOKEN_SECRET, body["access_token"])
    assert verdict == "ok" and claims["aud"] == "https://cognitiveservices.azure.com"
    assert claims["tid"] == E.DEFAULT_TENANT_ID and claims["appid"] == E.DEFAULT_CLIENT_ID
    [rec] = entra.requests()
    assert (rec["endpoint"], rec["method"], rec["tenant"], rec["client_id"]) == (
        "entra", "POST", E.DEFAULT_TENANT_ID, E.DEFAULT_CLIENT_ID)
    assert rec["content_type"] == "application/x-www-form-urlencoded" and rec["client_secret_ok"] is True
    assert rec["form"]["grant_type"] == "client_credentials" and rec["form"]["scope"] == FORM["scope"]
    assert rec["form"]["client_secret"] != E.DEFAULT_CLIENT_SECRET and "*" in rec["form"]["client_secret"]
    records = json.dumps(entra.requests()) + json.dumps(entra.tokens())
    assert E.DEFAULT_CLIENT_SECRET not in records and body["access_token"] not in records
    [tok] = entra.tokens()
    assert tok["jti"] == claims["jti"] == rec["token_jti"] and tok["endpoint"] == "entra"
    assert entra.state()["requests_by_endpoint"] == {"entra": 1, "imds": 0}


@pytest.mark.parametrize("change, status, error, code", [
    ({"grant_type": None}, 400, "invalid_request", 900144),
    ({"grant_type": "password"}, 400, "unsupported_grant_type", 70003),
    ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type", 70003),
    ({"client_id": None}, 400, "invalid_request", 900144),
    ({"client_id": "99999999-9999-4999-8999-999999999999"}, 400, "unauthorized_client", 700016),
    ({"scope": None}, 400, "invalid_request", 900144),
    ({"scope": "https://cognitiveservices.azure.com"}, 400, "invalid_scope", 1002012),
    ({"scope": "https://cognitiveservices.azure.com/.default openid"}, 400, "invalid_scope", 1002012),
    ({"scope": "https://management.azure.com/.default"}, 400, "invalid_resource", 500011),
    ({"client_secret": None}, 401, "invalid_client", 7000216),
    ({"client_secret": "wrong-secret-0123456789"}, 401, "invalid_client", 7000215),
])
def test_client_credentials_field_errors(entra, change, status, error, code):
    form = {k: v for k, v in {**FORM, **change}.items() if v is not None}
    r = client_credentials(entra, form)
    assert_entra_error(r, status, error, code)
    assert "wrong-secret-0123456789" not in r.text
    assert entra.tokens() == [] and entra.requests()[0]["error"] == error


@pytest.mark.parametrize("send", ["json", "text/plain", "multipart", "no body"])
def test_client_credentials_needs_form_encoding(entra, send):
    if send == "json":
        r = requests.post(token_url(entra), json=FORM, headers=LOGIN, timeout=T)
    elif send == "multipart":
        r = requests.post(token_url(entra), files={k: (None, v) for k, v in FORM.items()}, headers=LOGIN, timeout=T)
    elif send == "text/plain":
        r = requests.post(token_url(entra), data="&".join(f"{k}={v}" for k, v in FORM.items()), timeout=T,
                          headers={**LOGIN, "Content-Type": "text/plain"})
    else:
        r = requests.post(token_url(entra), headers=LOGIN, timeout=T)
    assert_entra_error(r, 400, "invalid_request", 900144)
    assert "'grant_type'" in r.json()["error_description"]  # the body was not read


def test_client_credentials_charset_param_is_fine(entra):
    body = "&".join(f"{k}={requests.utils.quote(v, safe='')}" for k, v in FORM.items())
    r = requests.post(token_url(entra), data=body, timeout=T,
                      headers={**LOGIN, "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_client_credentials_unknown_tenant_method_duplicates(entra):
    r = client_credentials(entra, tenant="not-my-tenant")
    assert_entra_error(r, 400, "invalid_request", 90002)
    assert "Tenant 'not-my-tenant' not found" in r.json()["error_description"]
    r = requests.get(token_url(entra), headers=LOGIN, timeout=T)
    assert_entra_error(r, 400, "invalid_request", 900561)
    r = requests.post(token_url(entra), data=list(FORM.items()) + [("scope", FORM["scope"])], headers=LOGIN,
                      timeout=T)
    assert_entra_error(r, 400, "invalid_request", 9000411)
    for path in ("/oauth2/v2.0/token", f"/{E.DEFAULT_TENANT_ID}/oauth2/token", f"/{E.DEFAULT_TENANT_ID}/oauth2/v2.0"):
        assert requests.post(entra.url(path), data=FORM, headers=LOGIN, timeout=T).status_code == 404, path


def test_client_credentials_more_tenants_and_clients():
    m = start_entra_mock(tenant_id="t-one,t-two", clients={"app-2": "second-secret-value"}, login_host="*")
    try:
        for tenant in ("t-one", "t-two"):
            assert client_credentials(m, tenant=tenant, headers={"Host": "anything"}).status_code == 200
        form = {**FORM, "client_id": "app-2", "client_secret": "second-secret-value"}
        assert client_credentials(m, form, tenant="t-one").status_code == 200
        r = client_credentials(m, {**form, "client_secret": E.DEFAULT_CLIENT_SECRET}, tenant="t-one")
        assert_entra_error(r, 401, "invalid_client", 7000215)  # each app has its own secret
        assert_entra_error(client_credentials(m), 400, "invalid_request", 90002)  # the default tenant is not here
    finally:
        m.stop()


def test_secrets_never_echoed_in_error_bodies(entra):
    # the secret placed where the service would echo a value back: scope, client_id, grant_type
    for field in ("scope", "client_id", "grant_type"):
        r = client_credentials(entra, {**FORM, field: E.DEFAULT_CLIENT_SECRET})
        assert r.status_code in (400, 401)
        assert E.DEFAULT_CLIENT_SECRET not in r.text, field
    r = client_credentials(entra, {**FORM, "scope": "my-own-secret-xyz", "client_secret": "my-own-secret-xyz"})
    assert r.status_code == 401 and "my-own-secret-xyz" not in r.text
    assert "my-own-secret-xyz" not in json.dumps(entra.requests())


# ----------------------------------------------------------------------------------------------
# IMDS


def test_imds_success_shape_and_string_types(entra):
    t0 = int(time.time())
    r = imds(entra)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"access_token", "client_id", "expires_in", "expires_on", "ext_expires_in", "not_before",
                         "resource", "token_type"}
    for field in ("expires_in", "expires_on", "ext_expires_in", "not_before"):
        assert isinstance(body[field], str) and body[field].isdigit(), field
    assert body["expires_in"] == "3599" and abs(int(body["expires_on"]) - (t0 + 3599)) <= 2
    assert body["resource"] == "https://cognitiveservices.azure.com" and body["token_type"] == "Bearer"
    assert body["client_id"] == E.DEFAULT_MI_CLIENT_ID
    assert verify_entra_token(TOKEN_SECRET, body["access_token"])[0] == "ok"
    r = imds(entra, f"{IMDS_QUERY}&client_id={USER_ASSIGNED}")
    assert r.status_code == 200 and r.json()["client_id"] == USER_ASSIGNED
    recs = entra.requests()
    assert [(x["endpoint"], x["client_id"]) for x in recs] == [("imds", E.DEFAULT_MI_CLIENT_ID),
                                                               ("imds", USER_ASSIGNED)]
    assert recs[0]["headers"]["metadata"] == "true" and recs[0]["query"]["api-version"] == "2018-02-01"


@pytest.mark.parametrize("query, headers, status, error, description", [
    (IMDS_QUERY, {"Metadata": None}, 400, "invalid_request", "Required metadata header not specified"),
    (IMDS_QUERY, {"Metadata": "True"}, 400, "invalid_request", "Required metadata header not specified"),
    (IMDS_QUERY, {"Metadata": "false"}, 400, "invalid_request", "Required metadata header not specified"),
    (IMDS_QUERY, {"X-Forwarded-For": "10.0.0.1"}, 400, "invalid_request", None),
    ("resource=https://cognitiveservices.azure.com", {}, 400, "invalid_request",
     "Required query variable 'api-version' is missing"),
    ("api-version=2019-08-01&resource=https://cognitiveservices.azure.com", {}, 400, "invalid_request", None),
    ("api-version=2018-02-01", {}, 400, "invalid_request", "Required audience parameter not specified"),
    ("api-version=2018-02-01&resource=https://cognitiveservices.azure.com/", {}, 400, "invalid_resource", None),
    ("api-version=2018-02-01&resource=https://management.azure.com", {}, 400, "invalid_resource", None),
    (IMDS_QUERY + "&client_id=44444444-4444-4444-8444-444444444444", {}, 400, "invalid_request",
     "Identity not found"),
])
def test_imds_errors(entra, query, headers, status, error, description):
    r = imds(entra, query, headers)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_description"} and body["error"] == error
    if description:
        assert body["error_description"] == description
    assert entra.tokens() == []


def test_imds_method_and_option_versions(entra):
    assert imds(entra, method="POST").status_code == 405
    m = start_entra_mock(imds_api_versions="2018-02-01,2019-08-01")
    try:
        assert imds(m, "api-version=2019-08-01&resource=https://cognitiveservices.azure.com").status_code == 200
    finally:
        m.stop()


@pytest.mark.parametrize("endpoint, host, status", [
    ("entra", "login.microsoftonline.com", 200),
    ("entra", "login.microsoftonline.com:443", 200),
    ("entra", "169.254.169.254", 421),
    ("entra", "127.0.0.1", 421),
    ("imds", "169.254.169.254", 200),
    ("imds", "login.microsoftonline.com", 421),
])
def test_host_header_per_endpoint(entra, endpoint, host, status):
    if endpoint == "entra":
        r = client_credentials(entra, headers={"Host": host})
    else:
        r = imds(entra, headers={"Host": host})
    assert r.status_code == status, r.text


# ----------------------------------------------------------------------------------------------
# tokens: lifetime, expiry enforced by the Azure mock


@pytest.mark.test_timeout(30)
def test_token_lifetime_at_run_time_and_expiry_enforced_by_azure(entra, azure_entra):
    entra.set_token_lifetime(1.5)
    cc = client_credentials(entra).json()
    mi = imds(entra).json()
    assert cc["expires_in"] == 2 and mi["expires_in"] == "2"  # rounded; the token's own expiry is exact
    for token in (cc["access_token"], mi["access_token"]):
        r = azure_chat(azure_entra, token)
        assert r.status_code == 200, r.text
        rec = azure_entra.last_request()
        assert rec["credential"] == "entra" and rec["entra_token"]["expired"] is False
    deadline = min(t["exp_ms"] for t in entra.tokens()) / 1000
    time.sleep(max(0.0, deadline - time.time()) + 0.2)
    for token in (cc["access_token"], mi["access_token"]):
        r = azure_chat(azure_entra, token)
        assert r.status_code == 401
        assert r.json() == {"error": {"code": "401", "message": "Unauthorized. Access token is missing, invalid, "
                                      "audience is incorrect (https://cognitiveservices.azure.com), or have expired."}}
        assert token not in r.text
        rec = azure_entra.last_request()
        assert rec["credential"] is None and rec["entra_token"]["expired"] is True
    # a fresh token works again; the v1 API and the Responses API check it the same way
    fresh = client_credentials(entra).json()["access_token"]
    h = {**AZURE_HOST, "Authorization": f"Bearer {fresh}"}
    r = requests.post(azure_entra.url("/openai/v1/responses"), json={"model": "gpt-4o-prod", "input": "x"},
                      headers=h, timeout=T)
    assert r.status_code == 200 and azure_entra.last_request()["credential"] == "entra"


def test_azure_refuses_foreign_tampered_and_unconfigured_tokens(entra, azure_entra, mock_factory):
    good = entra.mint(60)
    assert azure_chat(azure_entra, good).status_code == 200
    foreign = mint_entra_token("another-secret", 60)["access_token"]
    header, payload, sig = good.split(".")
    tampered = f"{header}.{payload[:-2]}AA.{sig}"
    wrong_aud = mint_entra_token(TOKEN_SECRET, 60, {"aud": "https://management.azure.com"})["access_token"]
    for token in (foreign, tampered, wrong_aud, "not.a.token", ""):
        assert azure_chat(azure_entra, token).status_code == 401, token
    plain = mock_factory("azure", name="azure-no-entra")  # without entra_token_secret: not accepted
    assert azure_chat(plain, good).status_code == 401
    # with an api-key, a valid Entra token next to it is fine; an expired one is not
    r = requests.post(azure_entra.url(CHAT_PATH), json=CHAT, timeout=T,
                      headers={**AZURE_HOST, "api-key": AZURE_KEY, "Authorization": f"Bearer {good}"})
    assert r.status_code == 200 and azure_entra.last_request()["credential"] == "api-key+entra"


def test_azure_entra_secret_set_at_run_time(entra, mock_factory):
    m = mock_factory("azure", name="azure-late")
    token = entra.mint(60)
    assert azure_chat(m, token).status_code == 401
    m.configure(entra_token_secret=TOKEN_SECRET)
    assert azure_chat(m, token).status_code == 200
    assert m.state()["entra_tokens"] is True


def test_script_expires_in_step(entra):
    entra.script([{"expires_in": 2}])
    body = client_credentials(entra).json()
    assert body["expires_in"] == 2
    assert entra.tokens()[0]["exp_ms"] - entra.tokens()[0]["issued_ms"] == pytest.approx(2000, abs=50)
    assert client_credentials(entra).json()["expires_in"] == 3599


# ----------------------------------------------------------------------------------------------
# scripting, recording, reset


@pytest.mark.parametrize("endpoint", ["entra", "imds"])
def test_script_failures(entra, endpoint):
    def call():
        return client_credentials(entra) if endpoint == "entra" else imds(entra)

    entra.script([{"status": 500}, {"status": 503, "repeat": 2}, {"status": 429, "retry_after": "1"},
                  {"close": True}, {"delay_ms": 300}])
    r = call()
    assert r.status_code == 500
    if endpoint == "entra":
        assert r.json()["error"] == "server_error" and r.json()["error_codes"] == [50000]
    else:
        assert set(r.json()) == {"error", "error_description"}
    assert [call().status_code for _ in range(2)] == [503, 503]
    r = call()
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    with pytest.raises(requests.exceptions.ConnectionError):
        call()
    t0 = time.monotonic()
    assert call().status_code == 200 and time.monotonic() - t0 >= 0.28
    assert call().status_code == 200  # script spent
    recs = entra.requests()
    assert [x["status"] for x in recs] == [500, 503, 503, 429, None, 200, 200]
    assert recs[4]["closed"] is True and recs[0]["step"] == {"status": 500}
    assert len(entra.tokens()) == 2


def test_script_skips_invalid_requests_and_custom_body(entra):
    entra.script([{"status": 503}, {"status": 200, "body": {"custom": True}, "headers": {"x-extra": "1"}}])
    assert client_credentials(entra, {**FORM, "client_secret": "bad"}).status_code == 401  # no step consumed
    assert imds(entra, headers={"Metadata": None}).status_code == 400
    assert client_credentials(entra).status_code == 503
    r = imds(entra)
    assert r.json() == {"custom": True} and r.headers["x-extra"] == "1"
    entra.script([{"status": 500, "repeat": "forever"}])
    assert {client_credentials(entra).status_code for _ in range(3)} == {500}
    entra.reset()
    assert client_credentials(entra).status_code == 200
    assert len(entra.requests()) == 1 and entra.state()["script"] == []


def test_control_api(entra):
    r = requests.post(entra.url("/__mock/config"), json={"token_lifetime": 3}, timeout=T)
    assert r.status_code == 400
    r = requests.post(entra.url("/__mock/config"), json={"token_lifetime_s": 0}, timeout=T)
    assert r.status_code == 400
    r = requests.post(entra.url("/__mock/script"), json={"status": 500}, timeout=T)
    assert r.status_code == 400
    assert requests.get(entra.url("/__mock/health"), timeout=T).json()["ok"] is True
    assert requests.get(entra.url("/__mock/nope"), timeout=T).status_code == 405
    assert entra.requests() == []  # control calls are not logged
    assert entra.set_token_lifetime(7)["token_lifetime_s"] == 7
    assert entra.provider == "entra"


def test_client_secret_in_url_is_a_leak(entra):
    r = requests.post(token_url(entra) + f"?client_secret={E.DEFAULT_CLIENT_SECRET}", data=FORM, headers=LOGIN,
                      timeout=T)
    assert r.status_code == 200  # the body is what counts; the URL copy is the leak
    [leak] = entra.leaks()
    assert "URL" in leak["reason"] and E.DEFAULT_CLIENT_SECRET not in json.dumps(leak)
    assert E.DEFAULT_CLIENT_SECRET not in json.dumps(entra.requests())
    entra.forbid(["azure-api-key-never-here"])
    imds(entra, headers={"x-api-key": "azure-api-key-never-here"})
    assert len(entra.leaks()) == 2
    entra.forbid([])
    entra.reset()


def test_cli_runs_standalone():
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "mocks" / "entra.py"), "--port", "0",
                             "--tenant-id", "cli-tenant", "--client-id", "cli-app", "--client-secret", "cli-secret",
                             "--token-lifetime-s", "60", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert wait_for_port(port)
        r = requests.post(f"http://127.0.0.1:{port}/cli-tenant/oauth2/v2.0/token", headers=LOGIN, timeout=T,
                          data={**FORM, "client_id": "cli-app", "client_secret": "cli-secret"})
        assert r.status_code == 200 and r.json()["expires_in"] == 60
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
