"""Tests of `make bench`'s arithmetic and report (bench/run.py), without running a benchmark: the
figures BENCHMARKS.md quotes are medians of the rounds, and a target is reported met only when it
is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module
    spec.loader.exec_module(module)
    return module


WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:40000/v1/chat/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.21ms  350.12us   9.87ms   88.00%
    Req/Sec    14.61k   410.22    15.20k    70.00%
  Latency Distribution
     50%    2.13ms
     75%    2.35ms
     90%    2.60ms
     99%    3.51ms
  29224 requests in 2.00s, 21.33MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  14612.00
Transfer/sec:     10.66MB
"""


def test_wrk_output_is_read(bench):
    r = bench.parse_wrk(WRK_OUTPUT)
    assert r["rps"] == 14612.0
    assert r["p50_us"] == 2130.0 and r["p99_us"] == 3510.0
    assert r["requests"] == 29224
    assert r["non_2xx"] == 3 and r["socket_errors"] == 0


def test_figures_are_medians_of_the_rounds_one_by_one(bench):
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert bench.median([None, 5.0]) == 5.0
    assert bench.median([]) is None
    rounds = [
        {"rps": 100.0, "p50_us": 9.0, "raw": "text"},
        {"rps": 300.0, "p50_us": 1.0},
        {"rps": 200.0, "p50_us": 5.0},
    ]
    # Each figure on its own: the median req/s and the median p50 come from different rounds.
    assert bench.medians(rounds) == {"rps": 200.0, "p50_us": 5.0}


def result(key: str, rps: float, cpu_us: float, p50_1: float) -> dict:
    return {
        "key": key,
        "title": key,
        "c32": {"rps": rps, "p50_us": 1000.0, "p99_us": 2000.0, "envoy_cpu": 0.98,
                "envoy_cpu_us_per_req": cpu_us},
        "c1": {"p50_us": p50_1},
        "rss_kib": 100_000,
        "cpu_least": cpu_us * 0.5,
        "errors": 0,
        "counters": {},
    }


def render(bench, rps: dict, size: int) -> str:
    cpu = {k: 1e6 / v for k, v in rps.items()}
    results = [result(k, v, cpu[k], 100.0 if k != "plain" else 80.0) for k, v in rps.items()]
    sizes = {"filter": size, "noop": 80_000, "filter_wasm_opt": None, "wasm_opt_version": "none"}
    machine = {"nproc": 2, "cpu": "test", "kernel": "test", "envoy": "1.40.0", "rustc": "rustc",
               "wrk": "wrk", "nginx": "nginx"}
    args = SimpleNamespace(body_size=143, rounds=6, duration=2, single_duration=1, pinning=None)
    return bench.report(results, sizes, machine, args, started=0.0)


def row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {name}"))


def test_targets_are_reported_met_only_when_met(bench):
    missed = render(bench, {"plain": 1000.0, "noop": 900.0, "success": 600.0, "failover": 300.0,
                            "floor": 700.0, "floor-failover": 350.0}, size=200_001)
    assert "**NOT met**" in row(missed, "3/2 success path vs no-op filter")
    # req/s, then the same from the median CPU/req and from the least CPU/req.
    assert row(missed, "3/2 success path vs no-op filter").endswith("| 0.667 | 0.667 |")
    assert "**NOT met**" in row(missed, "3/1 success path vs plain Envoy")
    assert "**NOT met**" in row(missed, "4/1 failover path vs plain Envoy")
    assert "**NOT met**" in row(missed, "llm_failover.wasm size")
    # The floor's section, from the same figures.
    assert "0.778" in row(missed, "6/2 floor, success path vs no-op filter")
    assert "0.350" in row(missed, "7/1 floor, failover path vs plain Envoy")
    assert "0.857" in row(missed, "3/6 success path")

    met = render(bench, {"plain": 1000.0, "noop": 900.0, "success": 860.0, "failover": 500.0,
                         "floor": 880.0, "floor-failover": 520.0}, size=200_000)
    for name in ("3/2 success path vs no-op filter", "3/1 success path vs plain Envoy",
                 "4/1 failover path vs plain Envoy", "llm_failover.wasm size"):
        assert "| met |" in row(met, name), row(met, name)
    # Added p50 at one connection: 100 us against plain Envoy's 80 us.
    assert "+20 us" in row(met, "added p50 at 1 connection")

