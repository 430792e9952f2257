#!/usr/bin/env python3
"""`make outage-picture`: docs/outage.png, one real outage as the shipped dashboard shows it.

The run of tests/outage.py (a real Envoy with the filter, OpenAI -> Azure, the strict mocks, steady
traffic, a real Prometheus scraping Envoy every second with the shipped alerting rules at short
windows): OpenAI healthy, then answering 429/503 to everything, then healthy again. The picture
plots the dashboard's own queries over that run, from Prometheus: answers per second by the target
that gave them (and the cache), and the share of traffic moved off OpenAI with the time the
LLMFailoverFailingOver alert fired. About 90 seconds.

    .venv/bin/python tools/outage_plot.py [docs/outage.png]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import prometheus_server as ps  # noqa: E402
from outage import start_with_short_rules  # noqa: E402

HEALTHY_S, OUTAGE_S, RECOVERED_S = 20, 30, 25
ALERT = "LLMFailoverFailingOver"
COLORS = {"openai": "#2e8b57", "azure": "#1f77b4", "cache": "#b0b0b0"}
NAMES = {"openai": "OpenAI", "azure": "Azure OpenAI", "cache": "cache"}


def panel_queries(dash: dict, title_start: str) -> list[str]:
    [panel] = [p for p in ps.panels(dash) if p["title"].startswith(title_start)]
    values = ps.variable_values(dash)
    return [ps.substitute(t["expr"], values) for t in panel["targets"]]


def series(result: list[dict], t0: float, label: str) -> dict[str, tuple[list[float], list[float]]]:
    """{label value: (seconds since t0, values)}; a series without the label is "cache"."""
    out = {}
    for s in result:
        xs = [float(t) - t0 for t, _ in s["values"]]
        ys = [float(v) if float(v) == float(v) else 0.0 for _, v in s["values"]]
        out[s["metric"].get(label, "cache")] = (xs, ys)
    return out


def record() -> dict:
    dash = ps.load_dashboard()
    lab = start_with_short_rules()
    try:
        prom = lab.prometheus
        lab.run_traffic()
        healthy = lab.phase("healthy", HEALTHY_S)
        outage = lab.outage(OUTAGE_S)
        recovered = lab.phase("recovered", RECOVERED_S)
        # The first seconds are left out: the rate window still reaches back before the traffic.
        start, end = healthy.start + 5, recovered.end
        answers, cache = panel_queries(dash, "Answers by target")
        [moved] = panel_queries(dash, "Traffic moved off each target")
        return {
            "t0": start, "end": end, "outage": (outage.start, outage.end),
            "answers": prom.query_range(answers, start, end) + prom.query_range(cache, start, end),
            "moved": prom.query_range(moved, start, end),
            "alert": prom.query_range(f'ALERTS{{alertname="{ALERT}", alertstate="firing"}}', start, end),
            "requests": len(lab.answers), "errors": sum(a.status != 200 for a in lab.answers),
        }
    finally:
        lab.stop()


def draw(run: dict, out: Path):
    t0 = run["t0"]
    o_start, o_end = run["outage"][0] - t0, run["outage"][1] - t0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.2), sharex=True, height_ratios=[3, 1.4],
                                      constrained_layout=True)
    fig.suptitle("An OpenAI outage on the llm-failover dashboard (one real run, Prometheus every 1 s)",
                 fontsize=13, fontweight="bold")

    answers = series(run["answers"], t0, "target")
    order = [k for k in ("openai", "azure", "cache") if k in answers]
    xs = answers[order[0]][0]
    top.stackplot(xs, *[answers[k][1] for k in order], labels=[NAMES[k] for k in order],
                  colors=[COLORS[k] for k in order], alpha=0.9, linewidth=0, zorder=2)
    ymax = max(sum(v) for v in zip(*[answers[k][1] for k in order])) * 1.3
    top.set_ylim(0, ymax)
    top.axvspan(o_start, o_end, color="#d62728", alpha=0.10, linewidth=0, zorder=0)
    top.axvline(o_start, color="#d62728", linewidth=1.2, zorder=3)
    top.axvline(o_end, color="#d62728", linewidth=1.2, linestyle="--", zorder=3)
    top.text((o_start + o_end) / 2, ymax * 0.95, "OpenAI answers 429 / 503 to everything",
             ha="center", va="top", color="#a01010", fontsize=11, fontweight="bold")
    top.text(o_end + 0.7, ymax * 0.95, "OpenAI healthy again", ha="left", va="top", color="#a01010", fontsize=10)
    top.set_ylabel("answers per second")
    top.set_title(f"Answers by target (who serves now): {run['requests']} requests, "
                  f"{run['errors']} errors seen by the clients", fontsize=11, loc="left")
    top.legend(loc="upper left", fontsize=10, framealpha=0.9)
    top.grid(alpha=0.3)

    moved = series(run["moved"], t0, "target").get("openai")
    if moved:
        bottom.plot(moved[0], [100 * v for v in moved[1]], color="#ff7f0e", linewidth=2,
                    label="requests moved off OpenAI (failed over or skipped while cooling)")
    for s in run["alert"]:
        times = [float(t) - t0 for t, _ in s["values"]]
        bottom.axvspan(min(times), max(times), color="#ff7f0e", alpha=0.18, linewidth=0,
                       label=f"{ALERT} firing (test windows: 10 s, for 1 s)")
    bottom.axvspan(o_start, o_end, color="#d62728", alpha=0.10, linewidth=0)
    bottom.set_ylim(0, 165)
    bottom.set_yticks([0, 25, 50, 75, 100])
    bottom.set_ylabel("% of requests")
    bottom.set_xlabel("seconds")
    bottom.set_xlim(0, run["end"] - t0)
    bottom.legend(loc="upper center", ncol=2, fontsize=9, framealpha=0.9)
    bottom.grid(alpha=0.3)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "outage.png"
    draw(record(), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
