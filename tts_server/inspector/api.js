// The gateway's API as the page uses it: one streamed search, and the stored traces.
// Errors come back as the API sends them (OpenAI's shape), as an ApiError.

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param ?? null;
    this.code = error.code ?? null;
  }
}

function headers(key, json) {
  const out = {};
  if (key) out.Authorization = `Bearer ${key}`;
  if (json) out["Content-Type"] = "application/json";
  return out;
}

async function failure(response) {
  let error = { message: `HTTP ${response.status}` };
  try {
    const body = await response.json();
    if (body && body.error) error = body.error;
  } catch (_) { /* not JSON: keep the status */ }
  return new ApiError(response.status, error);
}

export async function model(key) {
  const response = await fetch("/v1/models", { headers: headers(key) });
  if (!response.ok) throw await failure(response);
  const body = await response.json();
  return body.data[0].id;
}

// Runs one search as a stream with its trace asked for; `onChunk` sees every parsed chunk
// (progress ones carry tts.progress and the tree's new nodes). Resolves with the last chunk
// that has the whole tts report (its `trace`) and the response id.
export async function runSearch({ key, mode, text, strategy, budget, beamWidth }, onChunk) {
  const name = await model(key);
  const tts = { strategy, budget, beam_width: beamWidth, return_trace: true };
  const body = mode === "text"
    ? { model: name, prompt: text, stream: true, tts }
    : { model: name, messages: [{ role: "user", content: text }], stream: true, tts };
  const path = mode === "text" ? "/v1/completions" : "/v1/chat/completions";
  const response = await fetch(path, { method: "POST", headers: headers(key, true), body: JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") continue;
        const chunk = JSON.parse(payload);
        if (chunk.error) throw new ApiError(chunk.error.code || 500, chunk.error);
        id = chunk.id || id;
        if (chunk.tts && chunk.tts.trace) last = chunk;
        onChunk(chunk);
      }
    }
  }
  if (!last) throw new ApiError(500, { message: "the stream ended without an answer" });
  return { id, tts: last.tts };
}

export async function getTrace(key, id) {
  const response = await fetch(`/inspector/api/traces/${encodeURIComponent(id)}`, { headers: headers(key) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function recentTraces(key) {
  const response = await fetch("/inspector/api/traces", { headers: headers(key) });
  if (!response.ok) throw await failure(response);
  return (await response.json()).data;
}
