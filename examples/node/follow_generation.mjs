#!/usr/bin/env node
// Submit a generation and follow it live, as a Next.js route and page would.
//
//   AI_HANDLER_API_URL=http://127.0.0.1:8000 AI_HANDLER_API_KEY=aih_... \
//     node follow_generation.mjs --user demo --model demo/pixel-sketch --prompt "a fox"
//
// backend(): runs on your server, holds the API key. It submits the generation and mints a
//   short-lived read-only token for the user (POST /v1/tokens).
// page(): runs in the browser. It gets only the generation id and that token, and follows
//   GET /v1/generations/{id}/events, resuming with Last-Event-ID when the connection drops.
//
// Node 20+, no dependencies. Exit code 0 when the generation succeeded, 1 otherwise.

import { parseArgs } from "node:util";

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
// The server sends a keep-alive comment every 15 s: silence for longer means a dead connection.
const IDLE_MS = 45_000;
const MAX_RETRIES = 10;

class Fatal extends Error {} // not worth retrying: a refusal, or the generation did not succeed

// --- backend: the only place that knows the API key -----------------------------------------

async function backend({ apiUrl, apiKey, user, model, input }) {
  const headers = { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" };
  const submitted = await call(`${apiUrl}/v1/generations`, {
    method: "POST",
    // Use your own request id (an order id): a retry with it never submits, or charges, twice.
    headers: { ...headers, "Idempotency-Key": crypto.randomUUID() },
    body: JSON.stringify({ user, model, input }),
  });
  console.log(`backend: submitted generation ${submitted.id} for ${user}`);
  const minted = await call(`${apiUrl}/v1/tokens`, {
    method: "POST",
    headers,
    body: JSON.stringify({ user, ttl_s: 600 }),
  });
  console.log(`backend: token for ${minted.user}, read-only, expires ${minted.expires_at}`);
  // What the route hands to the page: nothing else.
  return { generationId: submitted.id, token: minted.token };
}

// A JSON request; a refusal is a problem document (RFC 9457): its title and detail say why.
async function call(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) throw new Fatal(await problem(url, response));
  return response.json();
}

async function problem(url, response) {
  const body = await response.json().catch(() => ({}));
  return `${url}: ${response.status} ${body.title ?? ""}: ${body.detail ?? ""}`;
}

// --- page: sees the user token only ----------------------------------------------------------

async function page({ apiUrl, generationId, token }) {
  const url = `${apiUrl}/v1/generations/${generationId}/events`;
  const auth = { Authorization: `Bearer ${token}` };
  let lastEventId = null;
  let retryMs = 1000;
  for (let retries = 0; retries <= MAX_RETRIES; retries++) {
    if (retries > 0) {
      console.error(`page: stream interrupted, resuming after event ${lastEventId ?? "(none)"}`);
      await new Promise((resolve) => setTimeout(resolve, retryMs));
    }
    const headers = { ...auth, Accept: "text/event-stream" };
    if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
    const idle = new AbortController();
    let timer = setTimeout(() => idle.abort(), IDLE_MS);
    try {
      const response = await fetch(url, { headers, signal: idle.signal });
      if (response.status === 204) {
        // It ended right after the last event we saw: its outcome is in the generation itself.
        const generation = `${apiUrl}/v1/generations/${generationId}`;
        return fromGeneration(await call(generation, { headers: auth }));
      }
      if (response.status === 429 || response.status >= 500) continue;
      if (!response.ok) throw new Fatal(await problem(url, response));
      for await (const event of serverSentEvents(response.body)) {
        clearTimeout(timer);
        timer = setTimeout(() => idle.abort(), IDLE_MS);
        if (event.retry !== undefined) retryMs = event.retry;
        if (event.id !== undefined) lastEventId = event.id;
        if (event.data === undefined) continue; // a comment or a bare retry: no event
        retries = 0;
        const data = JSON.parse(event.data);
        console.log(`state: ${event.type} (event ${event.id})`);
        if (TERMINAL.has(event.type)) return data;
      }
      // The body ended before the terminal event: the connection was cut.
    } catch (error) {
      if (error instanceof Fatal) throw error;
      // Network errors, an aborted idle connection: resume.
    } finally {
      clearTimeout(timer);
    }
  }
  throw new Fatal(`events: gave up after ${MAX_RETRIES} reconnects`);
}

// GET /v1/generations/{id} says what the terminal event would have said.
function fromGeneration(generation) {
  return { ...generation, refunded: generation.credits.charged === 0 };
}

// A text/event-stream parser: events are separated by a blank line; each line is
// "field: value" (id, event, data, retry); lines starting with ":" are comments.
async function* serverSentEvents(body) {
  let buffer = "";
  let event = {};
  let data = [];
  for await (const chunk of body.pipeThrough(new TextDecoderStream())) {
    buffer += chunk;
    for (;;) {
      const end = /\r\n|\r|\n/.exec(buffer);
      // A "\r" at the very end may be the first half of "\r\n": wait for the next chunk.
      if (end === null || (end[0] === "\r" && end.index === buffer.length - 1)) break;
      const line = buffer.slice(0, end.index);
      buffer = buffer.slice(end.index + end[0].length);
      if (line === "") {
        if (data.length > 0) event.data = data.join("\n");
        if (Object.keys(event).length > 0) yield event;
        event = {};
        data = [];
      } else if (line.startsWith(":")) {
        event.comment = line.slice(1).trim(); // a keep-alive: no event, but not idle either
      } else {
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") event.type = value;
        else if (field === "id" && !value.includes("\0")) event.id = value;
        else if (field === "retry" && /^\d+$/.test(value)) event.retry = Number(value);
      }
    }
  }
}

// --- the script -------------------------------------------------------------------------------

async function main() {
  const { values } = parseArgs({
    options: {
      user: { type: "string", default: process.env.AI_HANDLER_USER ?? "demo" },
      model: { type: "string", default: process.env.AI_HANDLER_MODEL ?? "demo/pixel-sketch" },
      prompt: { type: "string", default: process.env.AI_HANDLER_PROMPT ?? "a fox in the snow" },
    },
  });
  const apiUrl = (process.env.AI_HANDLER_API_URL ?? "http://127.0.0.1:8000").replace(/\/+$/, "");
  const apiKey = process.env.AI_HANDLER_API_KEY;
  if (!apiKey) throw new Fatal("set AI_HANDLER_API_KEY (the key stays on the backend)");

  const { generationId, token } = await backend({
    apiUrl,
    apiKey,
    user: values.user,
    model: values.model,
    input: { prompt: values.prompt },
  });
  const outcome = await page({ apiUrl, generationId, token });
  if (outcome.status !== "succeeded") {
    const refunded = outcome.refunded ? "refunded" : "not refunded";
    const why = `${outcome.error_code}: ${outcome.error_message ?? ""}`;
    throw new Fatal(`generation ${generationId} ${outcome.status}: ${why} (${refunded})`);
  }
  for (const output of outcome.outputs) {
    console.log(`output: ${output.url} (${output.content_type}, ${output.size} bytes)`);
  }
}

main().catch((error) => {
  const cause = error.cause ? ` (${error.cause.message ?? error.cause})` : "";
  console.error(`error: ${error.message}${cause}`);
  process.exit(1);
});
