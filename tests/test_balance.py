"""Issue 17 in real Envoy (2 workers): load balancing by weight, and spill-over before the 429 from the
providers' own rate-limit headers."""

from __future__ import annotations

import collections
import time

import requests

import harness
from harness import azure_target, openai_target, plugin_config

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def lb_config(openai_weight: int, azure_weight: int, **top) -> dict:
    cfg = plugin_config([openai_target(retries=0, cooldown=False, weight=openai_weight),
                         azure_target(retries=0, cooldown=False, weight=azure_weight)], **top)
    cfg["strategy"]["mode"] = "loadbalance"
    return cfg


def serve(stack, n: int, path: str = "/v1/chat/completions", body=CHAT) -> list[requests.Response]:
    with requests.Session() as s:
        return [s.post(stack.url(path), json=body, timeout=10) for _ in range(n)]


def test_weights_three_to_one_split_first_attempts_three_to_one(make_stack, openai_mock, azure_mock):
    """400 requests with weights 3:1: the number served by openai is binomial(400, 0.75), mean 300,
    standard deviation 8.7. Accepting 261..339 (4.5 standard deviations) fails a correct filter once
    in about 150,000 runs, while an unweighted 1:1 split (mean 200) or a 1:3 one always fails."""
    stack = make_stack(lb_config(3, 1))
    answers = serve(stack, 400)
    assert all(r.status_code == 200 for r in answers)
    assert all(r.headers["x-llm-failover-attempts"] == "1" for r in answers)
    served = collections.Counter(r.headers["x-llm-failover-target"] for r in answers)
    assert 261 <= served["openai"] <= 339, served
    assert served["openai"] + served["azure"] == 400
    assert len(openai_mock.api_requests()) == served["openai"]
    assert len(azure_mock.api_requests()) == served["azure"]
    picks = {t: stack.counter(f"llm_failover.picks.target.{t}") for t in ("openai", "azure")}
    assert picks == {"openai": served["openai"], "azure": served["azure"]}


def test_a_load_balanced_target_that_fails_still_fails_over(make_stack, openai_mock, azure_mock):
    stack = make_stack(lb_config(1, 1))
    azure_mock.script([{"status": 503, "repeat": "forever"}])
    answers = serve(stack, 60)
    assert all(r.status_code == 200 for r in answers)
    assert {r.headers["x-llm-failover-target"] for r in answers} == {"openai"}
    attempts = collections.Counter(r.headers["x-llm-failover-attempts"] for r in answers)
    # The ones azure was picked for went on to openai; there were some of each (p < 1e-17 not).
    assert attempts["2"] == len(azure_mock.api_requests()) > 0 and attempts["1"] > 0
    assert attempts["1"] + attempts["2"] == 60


def test_a_weight_of_zero_is_only_ever_a_fallback_and_routes_balance_over_their_steps(make_stack, openai_mock,
                                                                                      azure_mock):
    cfg = lb_config(2, 1)
    cfg["routes"] = [{"name": "azure-first", "path": "/r/chat", "operation": "chat",
                      "targets": ["azure", "openai"]}]
    stack = make_stack(cfg)
    # On the plain paths both targets take first attempts (2:1).
    plain = collections.Counter(r.headers["x-llm-failover-target"] for r in serve(stack, 60))
    assert plain["openai"] > 0 and plain["azure"] > 0
    # A weight of 0 makes a target a fallback only.
    cfg["targets"][0]["weight"] = 0
    stack = make_stack(cfg)
    served = collections.Counter(r.headers["x-llm-failover-target"] for r in serve(stack, 40, "/r/chat"))
    assert served == {"azure": 40}
    azure_mock.script([{"status": 500}])
    [r] = serve(stack, 1, "/r/chat")
    assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("openai", "2")


def spill_config(**openai) -> dict:
    return plugin_config([openai_target(retries=0, cooldown=False, spillover={"min_remaining_requests": 5},
                                        **openai),
                          azure_target(retries=0, cooldown=False)])


def test_a_primary_announcing_its_limit_gets_no_request_until_its_reset(make_stack, openai_mock, azure_mock):
    stack = make_stack(spill_config())
    openai_mock.script([{"headers": {"x-ratelimit-remaining-requests": "2",
                                     "x-ratelimit-reset-requests": "2s"}}])
    first = stack.post_json("/v1/chat/completions", CHAT)
    assert first.headers["x-llm-failover-target"] == "openai"
    announced = time.monotonic()
    # Both workers avoid openai until its reset: straight to azure, one attempt each.
    during = serve(stack, 20)
    assert time.monotonic() - announced < 1.8, "the requests must fall within the 2 s window"
    assert {(r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) for r in during} == {
        ("azure", "1")}
    assert len(openai_mock.api_requests()) == 1
    harness.wait_for(lambda: "skip target=openai reason=spillover" in stack.log_text, what="the skip log line")
    assert stack.counter("llm_failover.spillovers.target.openai") == 1
    assert stack.counter("llm_failover.spillover_skips.target.openai") == 20
    # After the reset openai gets traffic again.
    time.sleep(max(0.0, announced + 2.2 - time.monotonic()))
    after = serve(stack, 5)
    assert {r.headers["x-llm-failover-target"] for r in after} == {"openai"}
    assert len(openai_mock.api_requests()) == 6


def test_a_spilled_target_is_still_tried_when_it_is_the_only_one_left(make_stack, openai_mock, azure_mock):
    cfg = spill_config()
    cfg["targets"] = cfg["targets"][:1]
    stack = make_stack(cfg)
    openai_mock.script([{"headers": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"}}])
    answers = serve(stack, 3)
    assert all(r.status_code == 200 and r.headers["x-llm-failover-target"] == "openai" for r in answers)
    assert len(openai_mock.api_requests()) == 3


def test_a_low_token_count_on_a_failed_answer_spills_too(make_stack, openai_mock, azure_mock):
    stack = make_stack(plugin_config(
        [openai_target(retries=0, cooldown=False, spillover={"min_remaining_tokens": 1000}),
         azure_target(retries=0, cooldown=False)]))
    # A 429 (cooldown off) whose headers say the tokens run out for 2 seconds (OpenAI's form).
    openai_mock.script([{"status": 429, "headers": {"x-ratelimit-remaining-tokens": "12",
                                                    "x-ratelimit-reset-tokens": "1m0s"}}])
    r = stack.post_json("/v1/chat/completions", CHAT)
    assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure", "2")
    r = stack.post_json("/v1/chat/completions", CHAT)
    assert (r.headers["x-llm-failover-target"], r.headers["x-llm-failover-attempts"]) == ("azure", "1")
    assert len(openai_mock.api_requests()) == 1
