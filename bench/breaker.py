#!/usr/bin/env python3
"""The incident of issue 32, replayed against one Envoy (2 workers, the default breaker) to see
the distributions the tests only bound: how much a primary in a brownout still serves, how soon
an outage moves traffic, and how late after its Retry-After the primary is back.

    .venv/bin/python bench/breaker.py [--runs 3] [--clients 8] [--phase 10]

Each run: the primary (mock OpenAI) fails 30% of its answers with 503 at random for --phase s,
then answers every request 429 with `Retry-After: 5` for --phase s, then recovers; --clients
threads send chat completions (a new connection each) all along; the fallback (mock Azure) is
healthy. Per run it prints the primary's share of the brownout's requests, the client failures,
the time from the outage's start to the first request that skipped the primary, and how late
after the last Retry-After ran out the primary took traffic again (`back`) and the last request
skipped it (`last skip`). Loopback only, bounded: it stops by itself (about 3 x --phase s a run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import harness  # noqa: E402

RETRY_AFTER = 5
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def one_run(clients: int, phase: float) -> dict:
    openai = harness.start_mock("openai")
    azure = harness.start_mock("azure")
    cfg = harness.plugin_config([harness.openai_target(timeout="10s"),
                                 harness.azure_target(cooldown=False, timeout="10s")], deadline="30s")
    stack = harness.EnvoyStack(plugin_config=cfg, clusters={"openai": openai.port, "azure": azure.port},
                               concurrency=2)
    stack.start()
    results: list[tuple[float, int, str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = stack.post_json("/v1/chat/completions", BODY, timeout=30)
                row = (sent, r.status_code, r.headers.get("x-llm-failover-target", ""),
                       r.headers.get("x-llm-failover-attempts", ""))
            except Exception:  # noqa: BLE001 - a client failure is what we count
                row = (sent, 0, "", "")
            with lock:
                results.append(row)

    try:
        openai.fail_rate(0.3, statuses=[503])
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(phase)
        outage = time.monotonic()
        openai.fail_rate(0)
        openai.script([{"status": 429, "retry_after": str(RETRY_AFTER), "repeat": "forever"}])
        time.sleep(phase)
        openai.script([])
        recovered = time.monotonic()
        # The last 429 the primary gave (a probe), in the mock's clock, mapped to ours.
        last_429 = max((r["time"] for r in openai.requests() if r.get("status") == 429), default=None)
        wall_offset = time.time() - time.monotonic()
        time.sleep(phase)
        stop.set()
        for t in threads:
            t.join(timeout=40)
    finally:
        stack.stop()
        openai.stop()
        azure.stop()
    brownout = [r for r in results if start <= r[0] < outage]
    skips_after_outage = [r[0] for r in results if r[0] >= outage and r[2] == "azure" and r[3] == "1"]
    reopen = (last_429 - wall_offset + RETRY_AFTER) if last_429 is not None else recovered
    served_after = [r[0] for r in results if r[0] >= reopen and r[2] == "openai"]
    skips_after = [r[0] for r in results if r[0] >= reopen and r[2] == "azure" and r[3] == "1"]
    return {
        "requests": len(results),
        "failures": sum(1 for r in results if r[1] != 200),
        "brownout_primary_share": sum(1 for r in brownout if r[2] == "openai") / max(1, len(brownout)),
        "outage_to_first_skip": (min(skips_after_outage) - outage) if skips_after_outage else None,
        "back": (min(served_after) - reopen) if served_after else None,
        "last_skip": (max(skips_after) - reopen) if skips_after else 0.0,
    }


def spread(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    return f"min {min(v):.3f}  median {statistics.median(v):.3f}  max {max(v):.3f}  (n={len(v)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--phase", type=float, default=10.0, help="seconds of brownout, of outage, of recovery")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        run = one_run(args.clients, args.phase)
        runs.append(run)
        print(f"run {i + 1}: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in run.items()), flush=True)
    print("primary's share of the brownout's requests:", spread([r["brownout_primary_share"] for r in runs]))
    print("client failures:", sum(r["failures"] for r in runs), "of", sum(r["requests"] for r in runs))
    print("outage start -> first skip (s):", spread([r["outage_to_first_skip"] for r in runs]))
    print("Retry-After over -> primary serving (s):", spread([r["back"] for r in runs]))
    print("Retry-After over -> last skip (s):", spread([r["last_skip"] for r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
