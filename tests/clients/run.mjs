// One call of a real client library against an OpenAI-compatible base URL (the gateway), printed
// as one line of JSON for tests/test_clients.py:
//
//   node tests/clients/run.mjs <library> <scenario> <baseURL>
//
//   library   openai-node | ai-sdk
//   scenario  openai-node: chat | chat-stream | responses | responses-stream
//             ai-sdk:      generate-responses | stream-responses | generate-chat | stream-chat
//             (openai(...) is the Responses API, openai.chat(...) Chat Completions)
//
// Output: {"text", "target", "attempts", "chunks", "error"}: target and attempts are the gateway's
// x-llm-failover-target / -attempts headers as the library exposes them, chunks the number of
// streamed text pieces. The libraries' own retries are off, so what the app sees is the gateway's
// doing alone.
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText } from "ai";

const [library, scenario, baseURL] = process.argv.slice(2);
const MODEL = "gpt-4o";
const PROMPT = "Say hello.";
const API_KEY = "unused"; // the gateway holds the providers' keys

function fromHeaders(get) {
  return { target: get("x-llm-failover-target") ?? null, attempts: get("x-llm-failover-attempts") ?? null };
}

async function openaiNode() {
  const client = new OpenAI({ baseURL, apiKey: API_KEY, maxRetries: 0, timeout: 30_000 });
  const messages = [{ role: "user", content: PROMPT }];
  switch (scenario) {
    case "chat": {
      const { data, response } = await client.chat.completions.create({ model: MODEL, messages }).withResponse();
      return { text: data.choices[0].message.content, chunks: 0, ...fromHeaders((h) => response.headers.get(h)) };
    }
    case "chat-stream": {
      const { data: stream, response } = await client.chat.completions
        .create({ model: MODEL, messages, stream: true, stream_options: { include_usage: true } })
        .withResponse();
      let text = "";
      let chunks = 0;
      let usage = null;
      for await (const chunk of stream) {
        const piece = chunk.choices[0]?.delta?.content;
        if (piece) {
          text += piece;
          chunks += 1;
        }
        if (chunk.usage) usage = chunk.usage;
      }
      return { text, chunks, usage, ...fromHeaders((h) => response.headers.get(h)) };
    }
    case "responses": {
      const { data, response } = await client.responses.create({ model: MODEL, input: PROMPT }).withResponse();
      return { text: data.output_text, id: data.id, chunks: 0, ...fromHeaders((h) => response.headers.get(h)) };
    }
    case "responses-stream": {
      // The streaming helper (ResponseStream): events, then the final response.
      const stream = client.responses.stream({ model: MODEL, input: PROMPT });
      let chunks = 0;
      stream.on("response.output_text.delta", () => {
        chunks += 1;
      });
      const final = await stream.finalResponse();
      return { text: final.output_text, id: final.id, chunks, target: null, attempts: null };
    }
    default:
      throw new Error(`unknown openai-node scenario ${scenario}`);
  }
}

async function aiSdk() {
  const provider = createOpenAI({ baseURL, apiKey: API_KEY });
  const [mode, api] = scenario.split("-");
  const model = api === "chat" ? provider.chat(MODEL) : provider(MODEL);
  if (mode === "generate") {
    const result = await generateText({ model, prompt: PROMPT, maxRetries: 0 });
    return { text: result.text, chunks: 0, usage: result.usage, ...fromHeaders((h) => result.response.headers?.[h]) };
  }
  if (mode === "stream") {
    let failure = null;
    const result = streamText({
      model,
      prompt: PROMPT,
      maxRetries: 0,
      onError: ({ error }) => {
        failure = error;
      },
    });
    let text = "";
    let chunks = 0;
    for await (const piece of result.textStream) {
      text += piece;
      chunks += 1;
    }
    if (failure) throw failure;
    const response = await result.response;
    return { text, chunks, usage: await result.usage, ...fromHeaders((h) => response.headers?.[h]) };
  }
  throw new Error(`unknown ai-sdk scenario ${scenario}`);
}

try {
  const out = library === "openai-node" ? await openaiNode() : library === "ai-sdk" ? await aiSdk() : null;
  if (out === null) throw new Error(`unknown library ${library}`);
  console.log(JSON.stringify({ error: null, ...out }));
} catch (err) {
  const status = err?.status ?? err?.statusCode ?? null;
  console.log(JSON.stringify({ error: String(err?.message ?? err), status, text: null, chunks: 0 }));
  process.exitCode = 1;
}
