"""One run of an OpenAI Agents SDK agent against an OpenAI-compatible base URL (the gateway),
printed as one line of JSON for tests/test_clients.py:

    python tests/clients/agents_run.py <run | run-streamed> <responses | chat> <baseURL>

The agent's model talks through a custom AsyncOpenAI client pointed at the gateway (retries off,
so what the app sees is the gateway's doing alone); tracing is off, since there is no network to
export it to. Output: {"text", "chunks" (streamed text deltas), "error"}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from agents import (Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, set_tracing_disabled)
from openai import AsyncOpenAI
from openai.types.responses import ResponseTextDeltaEvent

MODEL = "gpt-4o"
PROMPT = "Say hello."


async def main(scenario: str, api: str, base_url: str) -> dict:
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
    model = (OpenAIResponsesModel(MODEL, client) if api == "responses"
             else OpenAIChatCompletionsModel(MODEL, client))
    agent = Agent(name="greeter", instructions="Answer briefly.", model=model)
    if scenario == "run":
        result = await Runner.run(agent, PROMPT)
        return {"text": result.final_output, "chunks": 0}
    if scenario == "run-streamed":
        result = Runner.run_streamed(agent, PROMPT)
        chunks = 0
        async for event in result.stream_events():
            if event.type == "raw_response_event" and isinstance(event.data, ResponseTextDeltaEvent):
                chunks += 1
        return {"text": result.final_output, "chunks": chunks}
    raise ValueError(f"unknown scenario {scenario}")


if __name__ == "__main__":
    try:
        out = {"error": None, **asyncio.run(main(*sys.argv[1:4]))}
        code = 0
    except Exception as exc:  # the test reads the error from the JSON
        out, code = {"error": f"{type(exc).__name__}: {exc}", "text": None, "chunks": 0}, 1
    print(json.dumps(out))
    sys.exit(code)
