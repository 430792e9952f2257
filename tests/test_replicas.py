"""Issue 26 in real Envoy: a fleet of Envoys that share nothing. Two Envoy processes (replicas A and
B) in front of the same mock OpenAI and Azure: a Responses API follow-up, retrieve and delete reach
the target that holds the response through either replica, with the official OpenAI SDK. A replica
that does not know a response's owner probes the chain; a target's "not found" sends the request on
and is never the client's answer while a target is left."""

from __future__ import annotations

import openai
import pytest

import harness
from harness import azure_target, make_client, openai_target, plugin_config

V1_DEPLOYMENTS = {"gpt-4o": "gpt-4o-prod", "*": "gpt-4o-mini-default"}


def replica_config() -> dict:
    # Targets cool after few failures: "not found" answers counted as failures would show.
    return plugin_config(
        [openai_target(retries=0, timeout="5s", cooldown={"after_failures": 2, "duration": "60s"}),
         azure_target(api_version="v1", deployments=V1_DEPLOYMENTS, retries=0, timeout="5s",
                      cooldown={"after_failures": 1, "duration": "60s"})],
        deadline="20s")


@pytest.fixture
def replicas(make_stack):
    """Replicas A and B: two Envoys with the same config and mocks, nothing shared."""
    return make_stack(replica_config()), make_stack(replica_config())


def create(client, **kw):
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Say hi.", **kw)
    return raw, raw.parse()


def created_on_azure_during_an_openai_outage(a, openai_mock, azure_mock, n: int) -> list[str]:
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    client = make_client(a)
    ids = []
    for _ in range(n):
        raw, resp = create(client)
        assert raw.headers["x-llm-failover-target"] == "azure"
        ids.append(resp.id)
    assert set(ids) <= azure_mock.response_ids()
    openai_mock.reset()  # OpenAI is healthy again (and never had these ids)
    return ids


def test_follow_up_retrieve_and_delete_through_another_replica_reach_azure(replicas, openai_mock, azure_mock):
    a, b = replicas
    first, second, third = created_on_azure_during_an_openai_outage(a, openai_mock, azure_mock, 3)
    client_b = make_client(b)

    # The follow-up: OpenAI says previous_response_not_found, so B asks Azure, which has it.
    raw, follow_up = create(client_b, previous_response_id=first, extra_headers={"x-request-id": "probed-follow-up"})
    assert raw.headers["x-llm-failover-target"] == "azure"
    assert raw.headers["x-llm-failover-attempts"] == "2"
    assert follow_up.previous_response_id == first
    assert follow_up.output_text.startswith("Hello from mock azure")
    assert follow_up.id in azure_mock.response_ids()

    # retrieve: OpenAI 404, then Azure.
    got = client_b.responses.with_raw_response.retrieve(second)
    assert got.headers["x-llm-failover-target"] == "azure"
    assert got.headers["x-llm-failover-attempts"] == "2"
    assert got.parse().id == second
    # B remembers the owner it found: the delete goes to Azure at once.
    deleted = client_b.responses.with_raw_response.delete(second)
    assert deleted.http_response.status_code == 200
    assert deleted.headers["x-llm-failover-target"] == "azure"
    assert deleted.headers["x-llm-failover-attempts"] == "1"
    # A delete of an id B never saw probes like a retrieve.
    deleted = client_b.responses.with_raw_response.delete(third)
    assert deleted.headers["x-llm-failover-target"] == "azure"
    assert deleted.headers["x-llm-failover-attempts"] == "2"
    stored = {r["id"]: r for r in azure_mock.stored_responses()}
    assert stored[second]["deleted"] and stored[third]["deleted"] and not stored[first]["deleted"]

    # What reached OpenAI: the probes, each answered with its own "not found".
    asked = [(r["method"], r["path"], (r["body"] or {}).get("previous_response_id"))
             for r in openai_mock.api_requests()]
    assert asked == [("POST", "/v1/responses", first),
                     ("GET", f"/v1/responses/{second}", None),
                     ("DELETE", f"/v1/responses/{third}", None)]
    # Azure got each request addressed for it, with its own key.
    paths = [(r["method"], r["path"]) for r in azure_mock.api_requests()][3:]
    assert paths == [("POST", "/openai/v1/responses"), ("GET", f"/openai/v1/responses/{second}"),
                     ("DELETE", f"/openai/v1/responses/{second}"), ("DELETE", f"/openai/v1/responses/{third}")]
    assert all(r["headers"]["api-key"] == harness.AZURE_KEY for r in azure_mock.api_requests())

    # Counted; and a "not found" is an answer, not a failure: OpenAI does not cool on B.
    assert b.prometheus_value("llm_failover_affinity_probes", target="openai", result="not_found") == 3
    assert b.prometheus_value("llm_failover_affinity_probes", target="azure", result="found") == 3
    assert b.counter("llm_failover.cooldowns.target.openai") == 0
    # Nor a failover: the fallbacks and the failing-over alert built on them do not move.
    assert b.prometheus_value("llm_failover_fallbacks", **{"from": "openai"}) == 0
    assert "failover from=" not in b.log_text
    [logged] = harness.wait_for(lambda: [line for line in b.access_log() if " req_id=probed-follow-up " in line],
                                what="the follow-up's access log line")
    assert "llmf_target=azure" in logged and "llmf_attempts=2" in logged and "llmf_failover=false" in logged
    harness.wait_for(lambda: "probing the chain" in b.log_text, what="the probe log line")
    harness.wait_for(lambda: "owner probe: not found on target=openai, asking target=azure" in b.log_text,
                     what="the probe's next-target log line")

    # The follow-up's own id was remembered on B when it was created: its follow-up is pinned.
    raw, _ = create(client_b, previous_response_id=follow_up.id)
    assert (raw.headers["x-llm-failover-target"], raw.headers["x-llm-failover-attempts"]) == ("azure", "1")


def test_a_response_that_exists_nowhere_gets_the_providers_own_not_found(replicas, openai_mock, azure_mock):
    _, b = replicas
    client_b = make_client(b)
    missing = "resp_" + "0" * 48
    with pytest.raises(openai.BadRequestError) as refused:
        create(client_b, previous_response_id=missing)
    assert refused.value.code == "previous_response_not_found"
    assert refused.value.param == "previous_response_id"
    headers = refused.value.response.headers
    assert (headers["x-llm-failover-target"], headers["x-llm-failover-attempts"]) == ("azure", "2")
    with pytest.raises(openai.NotFoundError) as absent:
        client_b.responses.retrieve(missing)
    assert absent.value.response.headers["x-llm-failover-attempts"] == "2"
    assert f"Response with id '{missing}' not found." in absent.value.message
    assert len(openai_mock.api_requests()) == 2 and len(azure_mock.api_requests()) == 2
    assert b.prometheus_value("llm_failover_affinity_probes", target="azure", result="not_found") == 2
    # The provider's own answer, with no target failing: no exhausted chain, no failover.
    assert b.prometheus_value("llm_failover_exhausted") == 0
    assert b.prometheus_value("llm_failover_fallbacks") == 0


def test_a_failing_owner_candidate_is_the_answer_rather_than_a_later_not_found(replicas, openai_mock, azure_mock):
    a, b = replicas
    _, on_openai = create(make_client(a))  # created on OpenAI through A
    openai_mock.script([{"status": 503, "repeat": "forever"}])
    # B does not know the owner: OpenAI fails (it may hold the response), Azure does not have it.
    with pytest.raises(openai.InternalServerError) as failed:
        create(make_client(b), previous_response_id=on_openai.id)
    assert failed.value.status_code == 503
    assert failed.value.response.headers["x-llm-failover-target"] == "openai"
    assert failed.value.response.headers["x-llm-failover-attempts"] == "2"
    assert [r["body"]["previous_response_id"] for r in azure_mock.api_requests()] == [on_openai.id]
    # The same for a retrieve.
    with pytest.raises(openai.InternalServerError) as failed:
        make_client(b).responses.retrieve(on_openai.id)
    assert failed.value.response.headers["x-llm-failover-target"] == "openai"
    assert b.prometheus_value("llm_failover_affinity_probes", target="openai", result="failed") == 2
    # A failure reached the client: both chains count as exhausted.
    assert b.prometheus_value("llm_failover_exhausted") == 2


def test_a_pinned_follow_up_goes_to_its_owner_while_it_cools(replicas, openai_mock, azure_mock):
    a, _ = replicas
    [first] = created_on_azure_during_an_openai_outage(a, openai_mock, azure_mock, 1)
    # Azure fails once on A (OpenAI too): it cools there for 60 s.
    openai_mock.script([{"status": 503}])
    azure_mock.script([{"status": 503}])
    assert a.chat().status_code == 503
    assert a.counter("llm_failover.cooldowns.target.azure") == 1
    # Only Azure holds the previous response: the follow-up goes there, not to OpenAI.
    raw, follow_up = create(make_client(a), previous_response_id=first)
    assert (raw.headers["x-llm-failover-target"], raw.headers["x-llm-failover-attempts"]) == ("azure", "1")
    assert follow_up.previous_response_id == first
    assert all(r["path"] != "/v1/responses" for r in openai_mock.api_requests())


def test_a_replica_probes_a_cooling_target_last_and_finds_the_response_there(replicas, openai_mock, azure_mock):
    a, b = replicas
    [first] = created_on_azure_during_an_openai_outage(a, openai_mock, azure_mock, 1)
    # Azure cools on B (it failed there once); OpenAI, failed once, does not.
    azure_mock.script([{"status": 503}])
    openai_mock.script([{"status": 503}])
    assert b.chat().status_code == 503
    assert b.counter("llm_failover.cooldowns.target.azure") == 1
    assert b.counter("llm_failover.cooldowns.target.openai") == 0
    raw, follow_up = create(make_client(b), previous_response_id=first)
    assert (raw.headers["x-llm-failover-target"], raw.headers["x-llm-failover-attempts"]) == ("azure", "2")
    assert follow_up.previous_response_id == first


def test_a_streamed_follow_up_through_another_replica_finds_its_response_too(replicas, openai_mock, azure_mock):
    a, b = replicas
    [first] = created_on_azure_during_an_openai_outage(a, openai_mock, azure_mock, 1)
    # B probes through callouts (the router could not tell OpenAI's "not found" from another
    # 400): Azure's stream arrives whole, and the SDK reads it as a stream.
    with make_client(b).responses.stream(model="gpt-4o", input="And then?", previous_response_id=first) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert final.previous_response_id == first
    assert final.output_text.startswith("Hello from mock azure")
    [probe] = openai_mock.api_requests()
    assert probe["body"]["stream"] is True and probe["body"]["previous_response_id"] == first
    assert azure_mock.api_requests()[-1]["body"]["stream"] is True
