#!/usr/bin/env python3
"""`make run`: start Envoy with llm-failover on 127.0.0.1:10000 (admin 127.0.0.1:9901).

Without provider keys: the local stack, Envoy (envoy/local.yaml, or the config given as the first
argument, e.g. envoy/routes.yaml: `make run CONFIG=envoy/routes.yaml`) in front of the mock OpenAI
(127.0.0.1:18001) and mock Azure OpenAI (127.0.0.1:18002) upstreams.
With OPENAI_API_KEY, AZURE_OPENAI_API_KEY and AZURE_OPENAI_RESOURCE set: the production config
(envoy/production.yaml) against the real services, with the Azure resource name filled in.
Runs until Ctrl-C and stops everything it started.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
ENVOY = os.environ.get("ENVOY_BIN", str(VENV_BIN / "envoy"))


def wait_ready(url, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def main():
    procs = []
    real = all(os.environ.get(k) for k in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_RESOURCE"))
    if real:
        resource = os.environ["AZURE_OPENAI_RESOURCE"]
        if not resource.replace("-", "").isalnum():
            sys.exit("AZURE_OPENAI_RESOURCE must be the resource name (letters, digits, '-')")
        build = ROOT / "build"
        build.mkdir(exist_ok=True)
        config = build / "production.yaml"
        config.write_text((ROOT / "envoy" / "production.yaml").read_text().replace("my-resource", resource))
        print(f"Real keys found: using envoy/production.yaml with Azure resource {resource!r}")
    else:
        config = ROOT / (sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else "envoy/local.yaml")
        if not config.is_file():
            sys.exit(f"no config {config}")
        mock = [str(VENV_BIN / "python"), str(ROOT / "tests" / "mocks" / "upstream.py")]
        procs.append(subprocess.Popen(mock + ["--provider", "openai", "--port", "18001", "--api-key", "sk-local-openai-mock-key"]))
        procs.append(subprocess.Popen(mock + ["--provider", "azure", "--port", "18002", "--api-key", "local-azure-mock-key",
                                              "--resource", "llmf-local", "--api-versions", "2024-10-21",
                                              "--deployments", "gpt-4o-prod,gpt-4o-mini-default"]))
    procs.append(subprocess.Popen([ENVOY, "-c", str(config), "--disable-hot-restart", "--concurrency", "2",
                                   "--component-log-level", "wasm:info"], cwd=ROOT))

    def stop(*_):
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if not wait_ready("http://127.0.0.1:9901/ready"):
        print("Envoy did not become ready; see its log above.", file=sys.stderr)
        stop()
    print("""
llm-failover is up: Envoy on http://127.0.0.1:10000 (admin http://127.0.0.1:9901). Ctrl-C stops it.
""")
    if not real and config.name == "routes.yaml":
        print("""Try the named route (see README.md, "Coming from BricksLLM"):
  curl -X POST 127.0.0.1:10000/api/routes/test/chat/completion -H 'Authorization: Bearer my-secret-key' \\
       -H 'Content-Type: application/json' -d '{"messages": [{"role": "system", "content": "hi"}]}'
""")
    elif not real and config.name == "ecds.yaml":
        print("""The plugin configuration comes from envoy/ecds/llm_failover.yaml through ECDS. Change it without a
restart: edit a copy in the same directory, then rename it over the original, e.g.
  sed 's/"retries": 1/"retries": 2/' envoy/ecds/llm_failover.yaml > envoy/ecds/.next.yaml
  mv envoy/ecds/.next.yaml envoy/ecds/llm_failover.yaml
  curl -s 127.0.0.1:9901/stats | grep extension_config_discovery.http_filter.llm_failover.update_
""")
    elif not real:
        print("""Try a failover (see README.md, "Try it"):
  curl -s -X POST 127.0.0.1:18001/__mock/script -d '[{"status": 429, "retry_after": "20", "repeat": 1}]'
  curl -si 127.0.0.1:10000/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
""")
    while True:
        for p in procs:
            if p.poll() is not None:
                print(f"{p.args[0]} exited with {p.returncode}", file=sys.stderr)
                stop()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
