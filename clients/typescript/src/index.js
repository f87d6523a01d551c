// Relay's JavaScript SDK: an ES module with no dependencies, for browsers and Node >= 18.
// It mirrors the Python SDK (clients/python): one client, one error type, retries that reuse
// an idempotency key, and an event stream that resumes by Last-Event-ID after a drop.

export const VERSION = "0.1.0";
const DEFAULT_URL = "http://127.0.0.1:8000";
const EVENTS_PATH = "/intent/execute-wasm/events";
// Retry-After longer than this is not waited for: the error is raised for the caller to decide.
const MAX_RETRY_AFTER_S = 60;
// How long an event stream keeps reconnecting before it raises.
const RECONNECT_WINDOW_MS = 60_000;
const SAFE_METHODS = new Set(["GET", "HEAD", "PUT", "DELETE"]);
// The gateway pings open streams every 15 s: a read that waits longer means a dead connection.
const STREAM_READ_TIMEOUT_MS = 45_000;
// Node 18 has Web Crypto only as node:crypto's webcrypto; browsers and Node >= 19 have it global.
const webcrypto = globalThis.crypto ?? (await import("node:crypto")).webcrypto;
const TERMINAL_EVENTS = new Set(["execution_complete", "execution_error"]);
const FINISHED = new Set(["completed", "failed", "cancelled"]);

/** A request Relay refused or could not answer (status 0: no answer came). */
export class RelayError extends Error {
  constructor({ status, type = "about:blank", title = "", detail = "", errors = [],
                requestId = null, headers = {}, body = {} }) {
    super(status ? `${status} ${title}: ${detail}` : `${title}: ${detail}`);
    this.name = "RelayError";
    this.status = status;
    this.type = type;
    this.title = title;
    this.detail = detail;
    this.errors = errors || [];
    this.requestId = requestId;
    this.headers = headers;
    this.body = body || {};
  }

  /** The last part of `type`: `rate-limited`, `not-found`, ... */
  get slug() {
    return this.type.split("/").pop();
  }

  static async fromResponse(response) {
    const headers = Object.fromEntries(response.headers.entries());
    const requestId = response.headers.get("x-request-id");
    const text = await response.text().catch(() => "");
    let body = null;
    try { body = JSON.parse(text); } catch { /* not JSON */ }
    if (body && typeof body === "object" && "type" in body) {
      return new RelayError({
        status: Number(body.status || response.status), type: String(body.type),
        title: String(body.title ?? ""), detail: String(body.detail ?? ""),
        errors: body.errors, requestId: body.request_id || requestId, headers, body,
      });
    }
    return new RelayError({ status: response.status, title: response.statusText,
                            detail: text.slice(0, 500), requestId, headers });
  }

  static fromTransport(error) {
    return new RelayError({ status: 0, title: "Connection failed",
                            detail: `${error?.name ?? "Error"}: ${error?.message ?? error}` });
  }
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); },
                          { once: true });
});

/** Exponential backoff with jitter, in ms: 250, 500, 1000, ... capped at 8 s, times [0.5, 1]. */
export function backoffMs(attempt) {
  return Math.min(8000, 250 * 2 ** attempt) * (0.5 + Math.random() / 2);
}

/** ms to wait before retrying a refused request, or null when it must not be retried. */
async function retryDelayMs(response, attempt) {
  if (response.status === 429) {
    let slug = "";
    try { slug = String((await response.clone().json()).type ?? "").split("/").pop(); }
    catch { return null; }
    if (slug !== "rate-limited") return null;
  } else if (response.status !== 503) {
    return null;
  }
  const retryAfter = response.headers.get("retry-after");
  if (retryAfter === null) return backoffMs(attempt);
  const seconds = Number(retryAfter);
  if (!Number.isFinite(seconds)) return backoffMs(attempt);
  return seconds <= MAX_RETRY_AFTER_S ? seconds * 1000 : null;
}

/** A fresh idempotency key, made before a request's first attempt and reused by its retries. */
export function newIdempotencyKey() {
  // randomUUID exists only in secure contexts (https, localhost); getRandomValues everywhere.
  if (typeof webcrypto.randomUUID === "function") {
    return `relay-client-${webcrypto.randomUUID().replaceAll("-", "")}`;
  }
  const bytes = webcrypto.getRandomValues(new Uint8Array(16));
  return `relay-client-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function dropUndefined(values) {
  return Object.fromEntries(Object.entries(values).filter(([, v]) => v !== undefined && v !== null));
}

function env(name) {
  return globalThis.process?.env?.[name] || undefined;
}

/**
 * The request fields an execute and a session call share, camelCase options to the API's names;
 * `fields` (other options, as the API names them) are sent as they are, and win.
 */
function callBody(options) {
  const { maxGas, maxMemory, maxTime, maxStack, idempotencyKey, stepGas, priority, callbackUrl,
          callbackEvents, ...fields } = options;
  const policy = dropUndefined({ max_gas: maxGas, max_memory: maxMemory, max_time: maxTime,
                                 max_stack: maxStack });
  const body = dropUndefined({
    step_gas: stepGas, priority, callback_url: callbackUrl, callback_events: callbackEvents,
    ...fields,
    // Made before the first attempt, so every retry of this request carries the same one.
    idempotency_key: idempotencyKey ?? fields.idempotency_key ?? newIdempotencyKey(),
  });
  if (Object.keys(policy).length) body.policy = { ...policy, ...body.policy };
  return body;
}

function executeBody(ref, inputs, options = {}) {
  const { entrypoint, environment, memoize, ...rest } = options;
  return dropUndefined({ cid: ref, entrypoint, inputs: inputs ?? [], environment, memoize,
                         ...callBody(rest) });
}

function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(dropUndefined(params))) {
    for (const item of Array.isArray(value) ? value : [value]) search.append(key, String(item));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

/** Server-Sent Events, line by line (id, data, retry, comments; a blank line ends a message). */
export class SseDecoder {
  constructor() { this.lastId = null; this.retryMs = null; this.data = []; }

  feed(line) {
    if (line === "") {
      if (!this.data.length) return null;
      const data = this.data.join("\n");
      this.data = [];
      const message = JSON.parse(data);
      if (!message || typeof message !== "object" || Array.isArray(message)) return null;
      return { id: this.lastId ?? "", type: String(message.type ?? ""), data: message };
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") this.data.push(value);
    else if (name === "id" && !value.includes("\0")) this.lastId = value;
    else if (name === "retry" && /^\d+$/.test(value)) this.retryMs = Number(value);
    return null;
  }
}

async function* lines(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let timer;
      const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error("no data from the event stream for 45 s")),
                           STREAM_READ_TIMEOUT_MS);
      });
      let chunk;
      try {
        chunk = await Promise.race([reader.read(), timeout]);
      } finally {
        clearTimeout(timer);
      }
      const { value, done } = chunk;
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = /\r\n|\r|\n/.exec(buffer)) !== null) {
        // A lone \r at the end may be the first half of \r\n: wait for more.
        if (match[0] === "\r" && match.index === buffer.length - 1) break;
        yield buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** A client of one Relay gateway. */
export class Relay {
  constructor({ url, apiKey, fetch, retries = 3, headers = {} } = {}) {
    if (retries < 0) throw new RangeError("retries must be 0 or more");
    this.url = (url || env("RELAY_URL") || DEFAULT_URL).replace(/\/+$/, "");
    this.apiKey = apiKey || env("RELAY_API_KEY") || null;
    this.retries = retries;
    // Called as a plain function: a browser's fetch called as a method of another object
    // throws "Illegal invocation".
    const impl = fetch ?? globalThis.fetch;
    this.fetch = (input, init) => impl.call(globalThis, input, init);
    this.headers = { ...headers };
    if (this.apiKey) this.headers["X-API-Key"] = this.apiKey;
    this.modules = new Modules(this);
    this.names = new Names(this);
    this.executions = new Executions(this);
    this.sessions = new Sessions(this);
    this.snapshots = new Snapshots(this);
    this.budgets = new Budgets(this);
    this.batches = new Batches(this);
    this.pipelines = new Pipelines(this);
    this.environments = new Environments(this);
    this.webhooks = new Webhooks(this);
    this.tokens = new Tokens(this);
  }

  /**
   * Send one request with the client's retries; throw RelayError for any error answer.
   * `safe`: repeating it cannot do anything twice (idempotency key, or idempotent method).
   */
  async request(method, path, { json, body, headers = {}, params, safe = false, signal } = {}) {
    const init = { method, headers: { ...this.headers, ...headers }, signal };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    } else if (body !== undefined) {
      init.body = body;
    }
    const target = `${this.url}${path}${params ? query(params) : ""}`;
    for (let attempt = 0; ; attempt++) {
      let response, delay;
      try {
        response = await this.fetch(target, init);
      } catch (error) {
        if (signal?.aborted) throw error;
        // fetch does not tell a refused connection from a reset after sending: only requests
        // that cannot run twice are sent again.
        if (attempt >= this.retries || !(safe || SAFE_METHODS.has(method))) {
          throw RelayError.fromTransport(error);
        }
        delay = backoffMs(attempt);
      }
      if (response) {
        if (response.ok) return response;
        delay = await retryDelayMs(response, attempt);
        if (delay === null || attempt >= this.retries) throw await RelayError.fromResponse(response);
        await response.body?.cancel().catch(() => {});
      }
      await sleep(delay, signal);
    }
  }

  async json(method, path, options) {
    const response = await this.request(method, path, options);
    return response.status === 204 ? null : response.json();
  }

  /** Run `ref` (a CID or `glyph://NAME@TAG`) and return its result once finished. */
  async execute(ref, inputs = [], options = {}) {
    const response = await this.request("POST", "/intent/execute-wasm",
                                        { safe: true, json: executeBody(ref, inputs, options) });
    const result = await response.json();
    if (response.status === 202) return this.handle(result.request_id).wait();
    return result;
  }

  /** Queue an execution and return at once a handle to follow and control it. */
  async submit(ref, inputs = [], options = {}) {
    const result = await this.json("POST", "/intent/execute-wasm", {
      safe: true, json: executeBody(ref, inputs, options), headers: { Prefer: "respond-async" },
    });
    return this.handle(result.request_id);
  }

  /** A handle on an execution already accepted. */
  handle(requestId) {
    return new ExecutionHandle(this, requestId);
  }

  /**
   * The caller's events as they come, narrowed when asked; `lastEventId` starts after that
   * event ("0": every event retained). Never ends by itself: a dropped connection is resumed
   * with Last-Event-ID; after 60 s without one it throws. Break out (or pass `signal`) to stop.
   */
  async* events({ requestId, sessionId, pipelineId, lastEventId, signal } = {}) {
    const ids = requestId === undefined ? undefined : [].concat(requestId);
    const path = EVENTS_PATH + query({ request_id: ids, session_id: sessionId,
                                       pipeline_id: pipelineId });
    let last = lastEventId ?? null;
    let failures = 0;
    let downSince = null;
    for (;;) {
      const headers = { ...this.headers, Accept: "text/event-stream" };
      if (last !== null) headers["Last-Event-ID"] = last;
      let error, delay;
      try {
        const response = await this.fetch(`${this.url}${path}`, { headers, signal });
        if (!response.ok) {
          delay = await retryDelayMs(response, failures);
          error = await RelayError.fromResponse(response);
          if (delay === null) throw error;
        } else {
          failures = 0;
          downSince = null;
          const decoder = new SseDecoder();
          for await (const line of lines(response.body)) {
            const event = decoder.feed(line);
            if (event) {
              if (event.id) last = event.id;
              yield event;
            }
          }
          error = RelayError.fromTransport(new Error("stream ended"));
          delay = 0;
        }
      } catch (caught) {
        if (caught instanceof RelayError || signal?.aborted) throw caught;
        error = RelayError.fromTransport(caught);
        delay = backoffMs(failures);
      }
      failures += 1;
      downSince ??= Date.now();
      if (Date.now() - downSince > RECONNECT_WINDOW_MS) throw error;
      await sleep(delay, signal);
    }
  }

  /**
   * The absolute URL of the event stream for a browser's EventSource, which cannot send
   * headers: `accessToken` (from `tokens.create()`) goes in the query, and so does
   * `lastEventId` to start after that event (a new EventSource sends no Last-Event-ID).
   */
  eventsUrl({ requestId, sessionId, pipelineId, accessToken, lastEventId } = {}) {
    if (!accessToken) {
      throw new TypeError("eventsUrl needs an accessToken from tokens.create(): an API key "
                          + "never goes in a URL");
    }
    const ids = requestId === undefined ? undefined : [].concat(requestId);
    return this.url + EVENTS_PATH + query({ request_id: ids, session_id: sessionId,
                                            pipeline_id: pipelineId, last_event_id: lastEventId,
                                            access_token: accessToken });
  }
}

/** One execution, by its request_id: follow it, wait for it, control it. */
export class ExecutionHandle {
  constructor(relay, requestId) { this.relay = relay; this.requestId = requestId; }

  get() { return this.relay.executions.get(this.requestId); }

  /** Its events from execution_queued to its terminal one (or events_lost). */
  async* events({ signal } = {}) {
    for await (const event of this.relay.events({ requestId: this.requestId, lastEventId: "0",
                                                  signal })) {
      yield event;
      if (TERMINAL_EVENTS.has(event.type) || event.type === "events_lost") return;
    }
  }

  /** Its result once finished; rejects with a TimeoutError after `timeoutMs`. */
  async wait({ timeoutMs } = {}) {
    const deadline = timeoutMs === undefined ? null : Date.now() + timeoutMs;
    let state = await this.get();
    for (let attempt = 0; !FINISHED.has(state.status); attempt++) {
      if (deadline !== null && Date.now() >= deadline) {
        const error = new Error(`execution ${this.requestId} is still ${state.status}`);
        error.name = "TimeoutError";
        throw error;
      }
      await sleep(Math.min(500, 50 * 2 ** attempt));
      state = await this.get();
    }
    return state;
  }

  pause() { return this.relay.executions.pause(this.requestId); }
  resume(additionalGas) { return this.relay.executions.resume(this.requestId, additionalGas); }
  step(gas) { return this.relay.executions.step(this.requestId, gas); }
  cancel() { return this.relay.executions.cancel(this.requestId); }
}

class Resource {
  constructor(relay) { this.relay = relay; }
}

const page = (body, key = "items") => ({ items: body[key], nextCursor: body.next_cursor ?? null });
const enc = encodeURIComponent;

function moduleContent(source) {
  const bytes = typeof source === "string" ? new TextEncoder().encode(source)
    : source instanceof Uint8Array ? source : new Uint8Array(source);
  const wasm = bytes.length >= 4 && bytes[0] === 0 && bytes[1] === 0x61 && bytes[2] === 0x73
    && bytes[3] === 0x6d;
  return [bytes, wasm ? "application/wasm" : "text/plain"];
}

class Modules extends Resource {
  /** Upload a module (wasm bytes or WAT text); with `name` (and `tag`) bind glyph://name@tag. */
  async push(source, { name, tag } = {}) {
    const [body, contentType] = moduleContent(source);
    return this.relay.json("POST", "/modules", { safe: true, body, params: { name, tag },
                                                 headers: { "Content-Type": contentType } });
  }
  get(cid) { return this.relay.json("GET", `/modules/${enc(cid)}`); }
  async list({ limit, cursor } = {}) {
    return page(await this.relay.json("GET", "/modules", { params: { limit, cursor } }), "modules");
  }
  async wasm(cid) {
    const response = await this.relay.request("GET", `/modules/${enc(cid)}/wasm`);
    return new Uint8Array(await response.arrayBuffer());
  }
  async delete(cid) { await this.relay.request("DELETE", `/modules/${enc(cid)}`); }
}

class Names extends Resource {
  set(name, tag, cid) {
    return this.relay.json("PUT", `/names/${enc(name)}/${enc(tag)}`, { json: { cid } });
  }
  async get(name) { return (await this.relay.json("GET", `/names/${enc(name)}`)).tags ?? {}; }
}

class Executions extends Resource {
  get(requestId) { return this.relay.json("GET", `/executions/${enc(requestId)}`); }
  async list({ status, sessionId, pipelineId, batchId, limit, cursor } = {}) {
    const params = { status, session_id: sessionId, pipeline_id: pipelineId, batch_id: batchId,
                     limit, cursor };
    return page(await this.relay.json("GET", "/executions", { params }));
  }
  async output(requestId) {
    const response = await this.relay.request("GET", `/executions/${enc(requestId)}/output`);
    return new Uint8Array(await response.arrayBuffer());
  }
  /** Every webhook delivery attempt of the execution's events, oldest first. */
  async deliveries(requestId, { limit, cursor } = {}) {
    return page(await this.relay.json("GET", `/executions/${enc(requestId)}/deliveries`,
                                      { params: { limit, cursor } }));
  }
  async cancel(requestId) { await this.relay.request("DELETE", `/executions/${enc(requestId)}`); }
  async pause(requestId) {
    await this.relay.request("POST", `/executions/${enc(requestId)}/pause`);
  }
  async resume(requestId, additionalGas) {
    await this.relay.request("POST", `/executions/${enc(requestId)}/resume`,
                             { json: dropUndefined({ additional_gas: additionalGas }) });
  }
  step(requestId, gas) {
    return this.relay.json("POST", `/executions/${enc(requestId)}/step`,
                           { json: dropUndefined({ gas }) });
  }
}

class Sessions extends Resource {
  create(cid, { environment, budget, ttl } = {}) {
    return this.relay.json("POST", "/sessions", { json: dropUndefined({ cid, environment, budget, ttl }) });
  }
  /**
   * Call `entrypoint` and answer its result (with `state_cid`) once its state is committed.
   * Without `idempotencyKey` one is made, so a retry is never a second call.
   */
  async call(sessionId, entrypoint, inputs = [], options = {}) {
    const json = { entrypoint, inputs: inputs ?? [], ...callBody(options) };
    const response = await this.relay.request("POST", `/sessions/${enc(sessionId)}/calls`,
                                              { safe: true, json });
    const result = await response.json();
    return response.status === 202 ? this.relay.handle(result.request_id).wait() : result;
  }
  get(sessionId) { return this.relay.json("GET", `/sessions/${enc(sessionId)}`); }
  /** Set new budget totals (below what is used, it stays exhausted). */
  update(sessionId, { budget }) {
    return this.relay.json("PATCH", `/sessions/${enc(sessionId)}`, { json: { budget } });
  }
  async list({ limit, cursor } = {}) {
    return page(await this.relay.json("GET", "/sessions", { params: { limit, cursor } }));
  }
  async close(sessionId) { await this.relay.request("DELETE", `/sessions/${enc(sessionId)}`); }
  async pause(sessionId) { await this.relay.request("POST", `/sessions/${enc(sessionId)}/pause`); }
  async resume(sessionId, additionalGas) {
    await this.relay.request("POST", `/sessions/${enc(sessionId)}/resume`,
                             { json: dropUndefined({ additional_gas: additionalGas }) });
  }
  step(sessionId, gas) {
    return this.relay.json("POST", `/sessions/${enc(sessionId)}/step`, { json: dropUndefined({ gas }) });
  }
  snapshot(sessionId, label) {
    return this.relay.json("POST", `/sessions/${enc(sessionId)}/snapshots`,
                           { json: dropUndefined({ label }) });
  }
}

class Snapshots extends Resource {
  create(sessionId, label) { return this.relay.sessions.snapshot(sessionId, label); }
  get(snapshotId) { return this.relay.json("GET", `/snapshots/${enc(snapshotId)}`); }
  async list({ limit, cursor } = {}) {
    return page(await this.relay.json("GET", "/snapshots", { params: { limit, cursor } }));
  }
  async delete(snapshotId) { await this.relay.request("DELETE", `/snapshots/${enc(snapshotId)}`); }
  async restore(snapshotId, { branchCount = 1, budget } = {}) {
    const body = await this.relay.json("POST", `/snapshots/${enc(snapshotId)}/restore`,
                                       { json: dropUndefined({ branch_count: branchCount, budget }) });
    return body.items;
  }
}

class Budgets extends Resource {
  create(limits = {}) { return this.relay.json("POST", "/budgets", { json: budgetBody(limits) }); }
  get(budgetId) { return this.relay.json("GET", `/budgets/${enc(budgetId)}`); }
  async list({ limit, cursor } = {}) {
    return page(await this.relay.json("GET", "/budgets", { params: { limit, cursor } }));
  }
  update(budgetId, limits = {}) {
    return this.relay.json("PUT", `/budgets/${enc(budgetId)}`, { json: budgetBody(limits) });
  }
  async delete(budgetId) { await this.relay.request("DELETE", `/budgets/${enc(budgetId)}`); }
  usage(budgetId) { return this.relay.json("GET", `/budgets/${enc(budgetId)}/usage`); }
}

function budgetBody({ principal, window, maxGas, maxTime, maxExecutions }) {
  return dropUndefined({ principal, window, max_gas: maxGas, max_time: maxTime,
                         max_executions: maxExecutions });
}

class Batches extends Resource {
  /** Run execute request bodies; `wait: false` returns at once with the batch_id. */
  run(items, { callbackUrl, wait = true } = {}) {
    const json = dropUndefined({
      items: items.map((item) => ({ idempotency_key: newIdempotencyKey(), ...item })),
      callback_url: callbackUrl,
    });
    return this.relay.json("POST", "/intent/execute-wasm/batch",
                           { safe: true, json, headers: wait ? {} : { Prefer: "respond-async" } });
  }
  get(batchId) { return this.relay.json("GET", `/batches/${enc(batchId)}`); }
}

class Pipelines extends Resource {
  /** Start a pipeline of `nodes` (execute bodies with an `id`; inputs may hold `{$ref}`). */
  create(nodes, { maxConcurrency, failFast, callbackUrl, callbackEvents, idempotencyKey,
                  ...fields } = {}) {
    const json = dropUndefined({ nodes, max_concurrency: maxConcurrency, fail_fast: failFast,
                                 callback_url: callbackUrl, callback_events: callbackEvents,
                                 idempotency_key: idempotencyKey ?? newIdempotencyKey(), ...fields });
    return this.relay.json("POST", "/pipelines", { safe: true, json });
  }
  get(pipelineId) { return this.relay.json("GET", `/pipelines/${enc(pipelineId)}`); }
  async list({ limit, cursor } = {}) {
    return page(await this.relay.json("GET", "/pipelines", { params: { limit, cursor } }));
  }
  async delete(pipelineId) { await this.relay.request("DELETE", `/pipelines/${enc(pipelineId)}`); }
  /** The pipeline once finished; `onProgress` gets each pipeline_progress event. */
  async wait(pipelineId, { onProgress } = {}) {
    for await (const event of this.relay.events({ pipelineId, lastEventId: "0" })) {
      if (event.type === "pipeline_progress") onProgress?.(event);
      if (event.type === "pipeline_complete" || event.type === "events_lost") break;
    }
    let state = await this.get(pipelineId);
    for (let attempt = 0; !FINISHED.has(state.status); attempt++) {
      await sleep(backoffMs(Math.min(attempt, 2)));
      state = await this.get(pipelineId);
    }
    return state;
  }
}

class Environments extends Resource {
  /** One page of the environments (the shipped `wasi` and `pure` among them). */
  async list({ limit, cursor } = {}) {
    return page(await this.relay.json("GET", "/environments", { params: { limit, cursor } }));
  }
  get(name) { return this.relay.json("GET", `/environments/${enc(name)}`); }
  /**
   * Create or replace an environment (administrators only): `definition` holds `description`,
   * `policy`, `wasi`, `max_output_bytes` and, to refuse a concurrent change (409), the
   * `version` it was read at.
   */
  put(name, definition = {}) {
    return this.relay.json("PUT", `/environments/${enc(name)}`, { json: definition });
  }
  /** Delete an environment (administrators only; a shipped one is 409). */
  async delete(name) { await this.relay.request("DELETE", `/environments/${enc(name)}`); }
}

class Webhooks extends Resource {
  /** The caller's current `whsec_…` signing secret, for verifyWebhook. */
  async secret() { return (await this.relay.json("GET", "/webhooks/secret")).secret; }
  /**
   * A new secret; deliveries are signed by both during the rotation grace period. Not sent
   * again after a dropped connection (it would rotate twice): `secret()` tells the current one.
   */
  async rotateSecret() { return (await this.relay.json("POST", "/webhooks/secret")).secret; }
  /** Delivery attempts of an execution's events or, with `pipelineId`, a pipeline's. */
  async deliveries(requestId, { pipelineId, limit, cursor } = {}) {
    let path;
    if (pipelineId !== undefined && pipelineId !== null) {
      path = `/pipelines/${enc(pipelineId)}/deliveries`;
    } else if (requestId !== undefined && requestId !== null) {
      path = `/executions/${enc(requestId)}/deliveries`;
    } else {
      throw new TypeError("deliveries needs a requestId or a pipelineId");
    }
    return page(await this.relay.json("GET", path, { params: { limit, cursor } }));
  }
}

class Tokens extends Resource {
  /**
   * A short-lived (at most 5 minutes), subscribe-only token for `eventsUrl`:
   * `{access_token, expires_at}`. Minted with the client's own credentials.
   */
  create() { return this.relay.json("POST", "/auth/tokens", { safe: true }); }
}

/** A webhook delivery whose signature or timestamp does not hold (see verifyWebhook). */
export class WebhookVerificationError extends Error {
  constructor(message) {
    super(message);
    this.name = "WebhookVerificationError";
  }
}

function header(headers, name) {
  if (typeof headers?.get === "function") return headers.get(name) ?? undefined;
  for (const [key, value] of Object.entries(headers ?? {})) {
    // node:http gives a repeated header as an array.
    if (key.toLowerCase() === name) return Array.isArray(value) ? value.join(" ") : value;
  }
  return undefined;
}

function base64Bytes(text) {
  const binary = atob(text);
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function sameBytes(a, b) {
  // Constant time for equal lengths: every byte is looked at whatever differs first.
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

/**
 * Check a Relay webhook delivery (Standard Webhooks 1.0) and answer its JSON event.
 * `secret` is the principal's `whsec_…` secret (`webhooks.secret()`), `headers` the delivery's
 * (a Headers or a plain object, any case), `body` its raw body as received (string or bytes:
 * parse it only after). Rejects with WebhookVerificationError when no `v1` signature matches
 * or `webhook-timestamp` is more than `toleranceS` seconds from now (a replay). Receivers
 * should still deduplicate by `webhook-id`.
 */
export async function verifyWebhook(secret, headers, body, { toleranceS = 300 } = {}) {
  const id = header(headers, "webhook-id");
  const timestamp = header(headers, "webhook-timestamp");
  const signatures = header(headers, "webhook-signature");
  for (const [name, value] of [["webhook-id", id], ["webhook-timestamp", timestamp],
                               ["webhook-signature", signatures]]) {
    if (value === undefined) throw new WebhookVerificationError(`missing header ${name}`);
  }
  if (!/^\s*-?\d+\s*$/.test(timestamp)) {
    throw new WebhookVerificationError("webhook-timestamp is not a number");
  }
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > toleranceS) {
    throw new WebhookVerificationError("webhook-timestamp is too far from now");
  }
  let key;
  try {
    key = base64Bytes(String(secret).replace(/^whsec_/, ""));
  } catch {
    throw new WebhookVerificationError("the secret is not whsec_ followed by base64");
  }
  const payload = typeof body === "string" ? new TextEncoder().encode(body)
    : body instanceof Uint8Array ? body : new Uint8Array(body);
  const prefix = new TextEncoder().encode(`${id}.${timestamp}.`);
  const signed = new Uint8Array(prefix.length + payload.length);
  signed.set(prefix);
  signed.set(payload, prefix.length);
  const hmac = await webcrypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" },
                                                false, ["sign"]);
  const expected = new Uint8Array(await webcrypto.subtle.sign("HMAC", hmac, signed));
  for (const candidate of signatures.trim().split(/\s+/)) {
    const comma = candidate.indexOf(",");
    if (comma < 0 || candidate.slice(0, comma) !== "v1") continue;
    let given;
    try { given = base64Bytes(candidate.slice(comma + 1)); } catch { continue; }
    if (sameBytes(given, expected)) {
      try {
        return JSON.parse(new TextDecoder().decode(payload));
      } catch {
        throw new WebhookVerificationError("the signed body is not JSON");
      }
    }
  }
  throw new WebhookVerificationError("no signature matches the secret");
}
