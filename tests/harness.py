"""Test harness: real Envoy running the project's own config in front of the strict mock upstreams.

Main pieces (all usable outside pytest too):

* ``EnvoyStack(base_config="envoy/local.yaml", plugin_config=None, clusters=None, vm_env=None, ...)``:
  copies the config, substitutes free loopback ports (listener, admin, every cluster endpoint),
  optionally replaces the plugin JSON and the VM environment, runs ``envoy`` from the repo root
  (``dist/llm_failover.wasm`` is relative to it), waits for ``/ready`` == LIVE and the listener.
  ``stack.url(path)``, ``stack.admin(path)``, ``stack.stats()``, ``stack.counter(name)``,
  ``stack.prometheus()``, ``stack.log_text``, ``stack.access_log()``, ``stack.stop()``.
* ``MockClient``: a handle on a mock upstream (in-process or not) through its control API.
* ``start_mock(provider, **opts) -> MockClient``: in-process mock on a free port.
* ``start_entra_mock(**opts) -> EntraClient``: in-process Entra ID + IMDS token mock (tests/mocks/entra.py).
* ``make_client(stack_or_url, api_key="unused", **kw)``: an ``openai.OpenAI`` client (no retries).
* ``assert_no_vm_failure(log)`` / ``vm_failure_lines(log)``: the Wasm VM never panicked/failed.
* ``validate_config(...)``: ``envoy --mode validate`` on a rendered config.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import requests
import yaml

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from mocks import upstream as mock_upstream  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "tools"))
import streamed_wiring as wiring  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "envoy" / "local.yaml"
DEFAULT_WASM = REPO_ROOT / "dist" / "llm_failover.wasm"
WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
TLS_UPSTREAM_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"

OPENAI_KEY = mock_upstream.DEFAULT_OPENAI_KEY
AZURE_KEY = mock_upstream.DEFAULT_AZURE_KEY
AZURE_RESOURCE = mock_upstream.DEFAULT_RESOURCE

HTTP_TIMEOUT = 30.0  # default timeout of every HTTP call the harness makes
START_TIMEOUT = 20.0  # Envoy start


def envoy_bin() -> str:
    return os.environ.get("ENVOY_BIN") or str(REPO_ROOT / ".venv" / "bin" / "envoy")


# ----------------------------------------------------------------------------------------------
# Ports

_port_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port() -> int:
    """A currently free loopback TCP port, never the same twice in this process."""
    with _port_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port found")


def wait_for_port(port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll predicate until it returns a truthy value (returned) or raise AssertionError at timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------
# Mock upstream handle


class MockClient:
    """Drives a mock upstream through its control API (works for in-process and external mocks)."""

    def __init__(self, base_url: str, server=None, thread=None):
        self.base_url = base_url.rstrip("/")
        self.server = server  # in-process MockServer, or None
        self.thread = thread
        self._http = requests.Session()
        self._http.verify = False

    # identity
    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def provider(self) -> str:
        return self.state()["provider"]

    @property
    def name(self) -> str:
        return self.state()["name"]

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def __repr__(self):
        return f"MockClient({self.base_url})"

    # control API: direct calls for an in-process mock (works with TLS + SNI checks too),
    # HTTP otherwise
    def _call(self, method, path, body=None):
        if self.server is not None:
            status, obj = self.server.control(method, path, json.loads(json.dumps(body)))
            obj = json.loads(json.dumps(obj))
        else:
            kw = {"json": body} if method == "POST" else {}
            r = self._http.request(method, self.url(path), timeout=HTTP_TIMEOUT, **kw)
            status, obj = r.status_code, (r.json() if r.content else None)
        if status != 200:
            raise AssertionError(f"mock control {method} {path} -> {status}: {obj}")
        return obj

    def _get(self, path):
        return self._call("GET", path)

    def _post(self, path, body):
        return self._call("POST", path, body)

    def reset(self):
        return self._post("/__mock/reset", {})

    def script(self, steps: list[dict], append: bool = False):
        """Steps applied to the next API requests in order; see tests/mocks/upstream.py."""
        if append:
            return self._post("/__mock/script", {"steps": steps, "append": True})
        return self._post("/__mock/script", steps)

    def fail_rate(self, rate: float, statuses: Iterable[int] = (429, 500, 503), seed: int | None = None):
        body: dict = {"rate": rate, "statuses": list(statuses)}
        if seed is not None:
            body["seed"] = seed
        return self._post("/__mock/fail_rate", body)

    def configure(self, **settings):
        """e.g. configure(stream_delay_ms=10)."""
        return self._post("/__mock/config", settings)

    def forbid(self, secrets: Iterable[str]):
        return self._post("/__mock/forbid", {"secrets": list(secrets)})

    def state(self) -> dict:
        return self._get("/__mock/state")

    def requests(self) -> list[dict]:
        """Every API request received since the last reset (control calls excluded)."""
        return self._get("/__mock/requests")

    def api_requests(self, path_contains: str | None = None) -> list[dict]:
        reqs = self.requests()
        if path_contains:
            reqs = [r for r in reqs if path_contains in r["path"]]
        return reqs

    def last_request(self) -> dict | None:
        reqs = self.requests()
        return reqs[-1] if reqs else None

    def request_count(self) -> int:
        return self.state()["requests"]

    def leaks(self) -> list[dict]:
        return self._get("/__mock/leaks")

    def tls_errors(self) -> list[dict]:
        return self._get("/__mock/tls")

    def stored_responses(self) -> list[dict]:
        """Responses API: every response id this mock created (id, status, store, background, deleted, ...)."""
        return self._get("/__mock/responses")

    def response_ids(self) -> set[str]:
        """Ids of the responses this mock created and still serves (stored, not deleted)."""
        return {r["id"] for r in self.stored_responses() if r["store"] and not r["deleted"]}

    def stop(self):
        """Stop an in-process mock (connections are dropped: the upstream 'goes away')."""
        if self.server is not None:
            self.server.stop()
        self._http.close()


def start_mock(provider: str, port: int = 0, **opts) -> MockClient:
    """Start an in-process mock upstream on a free loopback port (quiet by default)."""
    opts.setdefault("quiet", True)
    server, thread = mock_upstream.start(provider, port, **opts)
    wait_for_port(server.port)
    return MockClient(server.url, server, thread)


class EntraClient(MockClient):
    """A handle on the Entra ID + IMDS token mock (tests/mocks/entra.py): script/reset/requests/state
    like MockClient, plus the token controls."""

    def tokens(self) -> list[dict]:
        """Tokens issued (jti, endpoint, client_id, exp_ms), never the tokens themselves."""
        return self._get("/__mock/tokens")

    def set_token_lifetime(self, seconds: float):
        """Lifetime (and expires_in) of the tokens minted from now on."""
        return self.configure(token_lifetime_s=seconds)

    def mint(self, lifetime_s: float | None = None) -> str:
        """A token signed like the issued ones, without a token request (for Azure mock tests)."""
        body = {} if lifetime_s is None else {"lifetime_s": lifetime_s}
        return self._post("/__mock/mint", body)["access_token"]


def start_entra_mock(port: int = 0, **opts) -> EntraClient:
    """Start an in-process Entra ID + IMDS token mock on a free loopback port (quiet by default).

    opts: see tests/mocks/entra.py start(): tenant_id, client_id, client_secret, token_secret (share it
    with start_mock("azure", entra_token_secret=...)), token_lifetime_s, login_host, imds_host, ...
    """
    from mocks import entra as mock_entra

    opts.setdefault("quiet", True)
    server, thread = mock_entra.start(port, **opts)
    wait_for_port(server.port)
    return EntraClient(server.url, server, thread)


# ----------------------------------------------------------------------------------------------
# VM failure detection

VM_FAILURE_PATTERNS = [
    re.compile(r"panicked"),
    re.compile(r"wasm log[^\n]*\bpanic", re.IGNORECASE),
    re.compile(r"Function: proxy_on_\w+ failed"),
    re.compile(r"\bVM failed\b", re.IGNORECASE),
    re.compile(r"Wasm VM failed", re.IGNORECASE),
    re.compile(r"Uncaught RuntimeError"),
    re.compile(r"wasm trap", re.IGNORECASE),
    re.compile(r"Plugin configured to fail (closed|open) failed to load"),
    re.compile(r"Failed to load Wasm (module|code)", re.IGNORECASE),
]


def vm_failure_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(p.search(line) for p in VM_FAILURE_PATTERNS)]


def assert_no_vm_failure(log: str):
    bad = vm_failure_lines(log)
    assert not bad, "the Wasm VM failed / panicked:\n" + "\n".join(bad[:40])


# ----------------------------------------------------------------------------------------------
# Config rendering


def _set_endpoint(cluster: dict, address: str, port: int):
    la = cluster.setdefault("load_assignment", {"cluster_name": cluster["name"]})
    la["cluster_name"] = cluster["name"]
    la["endpoints"] = [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
        "address": address, "port_value": int(port)}}}}]}]


def _cluster_is_loopback(cluster: dict) -> bool:
    for ep in ((cluster.get("load_assignment") or {}).get("endpoints") or []):
        for lb in ep.get("lb_endpoints") or []:
            addr = (((lb.get("endpoint") or {}).get("address") or {}).get("socket_address") or {}).get("address")
            if addr in ("127.0.0.1", "localhost", "::1"):
                return True
    return False


def render_config(
    base_config: str | os.PathLike | None = None,
    *,
    plugin_config: dict | str | None = None,
    clusters: Mapping[str, Any] | None = None,
    vm_env: Mapping[str, str] | None = None,
    vm_env_replace: bool = False,
    host_env_keys: Iterable[str] | None = None,
    listener_port: int | None = None,
    admin_port: int | None = None,
    wasm_path: str | os.PathLike | None = None,
    without_wasm: bool = False,
    unmapped_clusters: str = "dead",
    mutate: Callable[[dict], None] | None = None,
    stream_side: bool = True,
) -> tuple[dict, dict]:
    """Load an Envoy YAML config and apply the harness substitutions.

    clusters: name -> port | {"port": int, "address": str, "tls": {"sni": str, "ca_file": str}}.
      A name absent from the file is added as a new cluster (a copy of the first cluster).
    unmapped_clusters: "dead" points loopback clusters that were not mapped at a closed port
      (so a test never talks to a mock that another process runs on the file's port); "keep"
      leaves them alone.
    stream_side: keep the file's streamed-failover wiring (tools/streamed_wiring.py: the Lua
      filter, the route's priority_group specifier, the router's upstream filter on the final
      filter's VM; a cluster added here copies the file's first cluster's retry circuit breaker);
      False strips it (the filter then fails streams over through callouts).
    Returns (config dict, info) where info has the ports used.
    """
    path = Path(base_config) if base_config else DEFAULT_CONFIG
    if not path.is_absolute():
        path = REPO_ROOT / path
    cfg = yaml.safe_load(path.read_text())
    info: dict[str, Any] = {"base_config": str(path), "listener_ports": [], "clusters": {}}

    admin_port = admin_port or free_port()
    cfg.setdefault("admin", {})["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
    info["admin_port"] = admin_port

    sr = cfg.setdefault("static_resources", {})
    for i, lst in enumerate(sr.get("listeners") or []):
        port = listener_port if (i == 0 and listener_port) else free_port()
        lst["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
        info["listener_ports"].append(port)

    # clusters
    existing = {c["name"]: c for c in sr.get("clusters") or []}
    mapping = dict(clusters or {})
    dead_port = None
    for name, c in existing.items():
        if name in mapping:
            continue
        if unmapped_clusters == "dead" and _cluster_is_loopback(c):
            dead_port = dead_port or free_port()
            _set_endpoint(c, "127.0.0.1", dead_port)
            info["clusters"][name] = dead_port
    for name, spec in mapping.items():
        if isinstance(spec, int):
            spec = {"port": spec}
        if name not in existing:
            template = copy.deepcopy(next(iter(existing.values()))) if existing else {
                "type": "STATIC", "connect_timeout": "2s"}
            template.pop("transport_socket", None)
            template["name"] = name
            sr.setdefault("clusters", []).append(template)
            existing[name] = template
        c = existing[name]
        _set_endpoint(c, spec.get("address", "127.0.0.1"), spec["port"])
        tls = spec.get("tls")
        if tls:
            tls_ctx: dict = {"@type": TLS_UPSTREAM_TYPE}
            if tls.get("sni"):
                tls_ctx["sni"] = tls["sni"]
            ctc: dict = {}
            if tls.get("ca_file"):
                ctc["validation_context"] = {"trusted_ca": {"filename": str(tls["ca_file"])}}
            tls_ctx["common_tls_context"] = ctc
            c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls_ctx}
        info["clusters"][name] = spec["port"]

    # wasm filter
    wasm_filters = wiring.listener_filters(cfg)
    if without_wasm:
        wiring.drop_upstream_filter(cfg)
        for lst in sr.get("listeners") or []:
            for chain in lst.get("filter_chains") or []:
                for f in chain.get("filters") or []:
                    hcm = f.get("typed_config") or {}
                    if "http_filters" in hcm:
                        hcm["http_filters"] = [hf for hf in hcm["http_filters"]
                                               if (hf.get("typed_config") or {}).get("@type") != WASM_FILTER_TYPE]
    else:
        for conf in wasm_filters:
            if plugin_config is not None:
                value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config, indent=2)
                conf["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value}
            vm = conf.setdefault("vm_config", {})
            if wasm_path is not None:
                vm["code"] = {"local": {"filename": str(wasm_path)}}
            env = vm.setdefault("environment_variables", {})
            if vm_env is not None:
                kv = {} if vm_env_replace else dict(env.get("key_values") or {})
                kv.update({str(k): str(v) for k, v in vm_env.items()})
                env["key_values"] = kv
            if host_env_keys is not None:
                env["host_env_keys"] = list(host_env_keys)
            if not env:
                vm.pop("environment_variables")
        if wasm_filters:
            info["plugin_config"] = wasm_filters[0].get("configuration", {}).get("value")

    if mutate is not None:
        mutate(cfg)
    if not stream_side:
        wiring.strip(cfg)
    elif not without_wasm:
        wiring.share_vm(cfg)
    return cfg, info


# ----------------------------------------------------------------------------------------------
# Envoy


class EnvoyStartError(RuntimeError):
    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


class EnvoyStack:
    """A real Envoy process running (a copy of) the project's config on free loopback ports."""

    def __init__(
        self,
        base_config: str | os.PathLike | None = None,
        plugin_config: dict | str | None = None,
        *,
        clusters: Mapping[str, Any] | None = None,
        vm_env: Mapping[str, str] | None = None,
        vm_env_replace: bool = False,
        host_env_keys: Iterable[str] | None = None,
        process_env: Mapping[str, str] | None = None,
        log_level: str = "info",
        component_log_level: str | None = None,
        concurrency: int = 2,
        start_timeout: float = START_TIMEOUT,
        wasm_path: str | os.PathLike | None = None,
        without_wasm: bool = False,
        unmapped_clusters: str = "dead",
        mutate: Callable[[dict], None] | None = None,
        stream_side: bool = True,
        extra_args: Iterable[str] = (),
        workdir: str | os.PathLike | None = None,
        keep_workdir: bool | None = None,
    ):
        self.base_config = base_config
        self.plugin_config = plugin_config
        self.render_kwargs = dict(plugin_config=plugin_config, clusters=clusters, vm_env=vm_env,
                                  vm_env_replace=vm_env_replace, host_env_keys=host_env_keys, wasm_path=wasm_path,
                                  without_wasm=without_wasm, unmapped_clusters=unmapped_clusters, mutate=mutate,
                                  stream_side=stream_side)
        self.process_env = dict(process_env or {})
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.concurrency = concurrency
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="llmf-envoy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if keep_workdir is None:
            keep_workdir = bool(os.environ.get("LLMF_KEEP_ENVOY_DIR"))
        self.keep_workdir = keep_workdir
        self.config_path = self.workdir / "envoy.yaml"
        self.log_path = self.workdir / "envoy.log"
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self.proc: subprocess.Popen | None = None
        self.config: dict | None = None
        self.info: dict = {}
        self.listener_port: int | None = None
        self.listener_ports: list[int] = []
        self.admin_port: int | None = None
        self._final_log: str | None = None
        self._final_stdout: str | None = None
        self._http = requests.Session()

    # -- lifecycle -----------------------------------------------------------------------------

    def render(self) -> Path:
        self.config, self.info = render_config(self.base_config, **self.render_kwargs)
        self.listener_ports = self.info["listener_ports"]
        self.listener_port = self.listener_ports[0] if self.listener_ports else None
        self.admin_port = self.info["admin_port"]
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return self.config_path

    def command(self) -> list[str]:
        cmd = [envoy_bin(), "-c", str(self.config_path), "--disable-hot-restart",
               "--concurrency", str(self.concurrency),
               "--use-dynamic-base-id", "--base-id-path", str(self.workdir / "base-id"),
               "-l", self.log_level, "--log-path", str(self.log_path),
               # access logs reach stdout.log within ~100 ms (default: every 10 s)
               "--file-flush-interval-msec", "100"]
        if self.component_log_level:
            cmd += ["--component-log-level", self.component_log_level]
        return cmd + self.extra_args

    def start(self) -> "EnvoyStack":
        last_err: EnvoyStartError | None = None
        for _attempt in range(3):
            self.render()
            try:
                self._spawn_and_wait()
                return self
            except EnvoyStartError as e:
                last_err = e
                self._kill()
                if "ddress already in use" not in e.log:
                    break
        assert last_err is not None
        raise last_err

    def _spawn_and_wait(self):
        for p in (self.log_path, self.stdout_path, self.stderr_path):
            p.write_text("")
        env = os.environ.copy()
        env.update(self.process_env)
        self._stdout_f = open(self.stdout_path, "ab")
        self._stderr_f = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._stdout_f, stderr=self._stderr_f, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        ready = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self._raw_log()
                raise EnvoyStartError(
                    f"envoy exited with code {self.proc.returncode} during start-up:\n{_tail(log, 40)}", log)
            if not ready:
                try:
                    r = self._http.get(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1)
                    ready = r.status_code == 200 and "LIVE" in r.text
                except requests.RequestException:
                    pass
            if ready and all(_port_open(p) for p in self.listener_ports):
                return
            time.sleep(0.05)
        log = self._raw_log()
        raise EnvoyStartError(f"envoy not ready after {self.start_timeout}s:\n{_tail(log, 40)}", log)

    def _raw_log(self) -> str:
        parts = []
        for p in (self.log_path, self.stderr_path):
            try:
                parts.append(p.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(x for x in parts if x)

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for f in ("_stdout_f", "_stderr_f"):
            fh = getattr(self, f, None)
            if fh is not None:
                fh.close()
                setattr(self, f, None)

    def stop(self) -> str:
        """Stop Envoy; returns (and keeps in .log_text) its log."""
        if self._final_log is not None:
            return self._final_log
        self._kill()
        self._final_log = self._raw_log()
        try:
            self._final_stdout = self.stdout_path.read_text(errors="replace")
        except OSError:
            self._final_stdout = ""
        self._http.close()
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self._final_log

    def restart(self) -> "EnvoyStack":
        """Stop and start again with the same settings (new ports)."""
        self.stop()
        self._final_log = self._final_stdout = None
        self._http = requests.Session()
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- logs ----------------------------------------------------------------------------------

    @property
    def log_text(self) -> str:
        """Envoy's log (live while running; the final text once stopped)."""
        return self._final_log if self._final_log is not None else self._raw_log()

    def log_offset(self) -> int:
        return len(self.log_text)

    def log_since(self, offset: int) -> str:
        return self.log_text[offset:]

    def access_log(self) -> list[str]:
        """Access log lines (the config's stdout access logger)."""
        if self._final_stdout is not None:
            text = self._final_stdout
        else:
            try:
                text = self.stdout_path.read_text(errors="replace")
            except OSError:
                text = ""
        return [line for line in text.splitlines() if line.strip()]

    def assert_no_vm_failure(self, since: int = 0):
        assert_no_vm_failure(self.log_text[since:])

    # -- HTTP ----------------------------------------------------------------------------------

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.listener_port}{path}"

    def request(self, method: str, path: str, **kw) -> requests.Response:
        """A request to the listener (fresh connection each time, bounded by a timeout)."""
        kw.setdefault("timeout", HTTP_TIMEOUT)
        return requests.request(method, self.url(path), **kw)

    def post_json(self, path: str, body: Any, headers: Mapping[str, str] | None = None, **kw) -> requests.Response:
        return self.request("POST", path, json=body, headers=dict(headers or {}), **kw)

    def chat(self, model: str = "gpt-4o", content: str = "hi", headers: Mapping[str, str] | None = None,
             **body) -> requests.Response:
        """POST /v1/chat/completions with a minimal body (extra body fields as keyword args)."""
        payload = {"model": model, "messages": [{"role": "user", "content": content}], **body}
        return self.post_json("/v1/chat/completions", payload, headers=headers)

    def admin(self, path: str, method: str = "GET", **kw) -> requests.Response:
        kw.setdefault("timeout", HTTP_TIMEOUT)
        return self._http.request(method, f"http://127.0.0.1:{self.admin_port}{path}", **kw)

    def stats(self, filter: str | None = None) -> dict[str, int | float]:
        """Counters and gauges from /stats?format=json as {name: value} (histograms left out)."""
        params = {"format": "json"}
        if filter:
            params["filter"] = filter
        r = self.admin("/stats", params=params)
        r.raise_for_status()
        out: dict[str, int | float] = {}
        for item in r.json().get("stats", []):
            if "name" in item and "value" in item:
                out[item["name"]] = item["value"]
        return out

    def stats_text(self) -> str:
        return self.admin("/stats").text

    def counter(self, name: str, default: int = 0) -> int | float:
        """A stat by name; 'llm_failover.x' also finds the plugin's 'wasmcustom.llm_failover.x'."""
        st = self.stats()
        for n in (name, "wasmcustom." + name):
            if n in st:
                return st[n]
        return default

    def counters_matching(self, pattern: str) -> dict[str, int | float]:
        rx = re.compile(pattern)
        return {k: v for k, v in self.stats().items() if rx.search(k)}

    def prometheus(self) -> str:
        r = self.admin("/stats/prometheus")
        r.raise_for_status()
        return r.text

    def prometheus_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Parsed /stats/prometheus: [(metric, {label: value}, number)]."""
        return parse_prometheus(self.prometheus())

    def prometheus_value(self, metric: str, default: float = 0, **labels: str) -> float:
        """Sum of the samples of metric whose labels include the given ones."""
        total, seen = 0.0, False
        for name, lbls, value in self.prometheus_samples():
            if name == metric and all(lbls.get(k) == v for k, v in labels.items()):
                total += value
                seen = True
        return total if seen else default

    def wait_for_counter(self, name: str, at_least: float, timeout: float = 10.0) -> float:
        wait_for(lambda: self.counter(name) >= at_least, timeout, what=f"stat {name} >= {at_least}")
        return self.counter(name)

    def __repr__(self):
        return f"EnvoyStack(listener={self.listener_port}, admin={self.admin_port}, running={self.running})"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


_PROM_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_PROM_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if not m:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _PROM_LABEL.findall(m.group(2) or "")}
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def validate_config(base_config=None, timeout: float = 60.0, **render_kwargs) -> tuple[int, str]:
    """Render a config like EnvoyStack does and run `envoy --mode validate` on it: (exit code, output)."""
    with tempfile.TemporaryDirectory(prefix="llmf-validate-") as d:
        cfg, _ = render_config(base_config, **render_kwargs)
        path = Path(d) / "envoy.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        p = subprocess.run([envoy_bin(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                            "-l", "info"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout + p.stderr


# ----------------------------------------------------------------------------------------------
# Clients and plugin configs


def make_client(target, api_key: str = "unused", **kw):
    """An openai.OpenAI client for an EnvoyStack (or a base URL ending in /v1), no SDK retries."""
    import openai

    base_url = target.url("/v1") if hasattr(target, "url") and not isinstance(target, str) else str(target)
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", HTTP_TIMEOUT)
    return openai.OpenAI(base_url=base_url, api_key=api_key, **kw)


def file_plugin_config(base_config=None) -> dict:
    """The plugin JSON of a config file, parsed (to derive variants from the shipped one)."""
    path = Path(base_config) if base_config else DEFAULT_CONFIG
    if not path.is_absolute():
        path = REPO_ROOT / path
    cfg = yaml.safe_load(path.read_text())
    filters = wiring.listener_filters(cfg)
    if not filters:
        raise ValueError(f"no Wasm filter in {path}")
    return json.loads(filters[0]["configuration"]["value"])


def openai_target(name: str = "openai", cluster: str | None = None, **fields) -> dict:
    t = {"name": name, "provider": "openai", "cluster": cluster or name, "api_key_env": "OPENAI_API_KEY"}
    t.update(fields)
    return t


def azure_target(name: str = "azure", cluster: str | None = None, resource_name: str = AZURE_RESOURCE,
                 api_version: str = "2024-10-21", deployments: dict | None = None, **fields) -> dict:
    t = {"name": name, "provider": "azure", "cluster": cluster or name, "resource_name": resource_name,
         "api_key_env": "AZURE_OPENAI_API_KEY", "api_version": api_version,
         "deployments": deployments if deployments is not None else {"gpt-4o": "gpt-4o-prod",
                                                                     "*": "gpt-4o-mini-default"}}
    t.update(fields)
    return t


def plugin_config(targets: list[dict], on_status_codes=(429, 500, 502, 503, 504), **top) -> dict:
    cfg = {"strategy": {"mode": "fallback", "on_status_codes": list(on_status_codes)}, "targets": targets}
    cfg.update(top)
    return cfg
