// Environments, webhooks, access tokens and the execute options through the SDK, against a real
// gateway (see sdk.test.js). tests/clients/test_typescript_sdk.py also sets RELAY_ADMIN_KEY (a
// principal with Action::"admin"), lets webhooks reach 127.0.0.1 over http, and passes
// deliveries signed by the Standard Webhooks reference library in RELAY_TEST_WEBHOOK_VECTORS.
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { createServer } from "node:http";
import { test } from "node:test";
import { Relay, RelayError, SseDecoder, WebhookVerificationError, verifyWebhook }
  from "../src/index.js";

const ADD_WAT = `(module (func (export "main") (param i32 i32) (result i32)
  local.get 0 local.get 1 i32.add))`;
const CALLING_LOOP_WAT = `(module (func $tick) (func (export "main") (loop (call $tick) (br 0))))`;
const COUNTER_WAT = `(module
  (global $n (mut i64) (i64.const 0))
  (func (export "add") (param i64) (result i64)
    (global.set $n (i64.add (global.get $n) (local.get 0)))
    (global.get $n)))`;
const URL_ = process.env.RELAY_URL;
const ADMIN_KEY = process.env.RELAY_ADMIN_KEY;
const LOCAL_WEBHOOKS = process.env.RELAY_TEST_LOCAL_WEBHOOKS === "1";

const relay = new Relay({ url: URL_, apiKey: process.env.RELAY_API_KEY });

/** `check()` until it answers something truthy; fails after `limitMs` (not a timing claim). */
async function until(check, what, limitMs = 30_000) {
  const deadline = Date.now() + limitMs;
  for (;;) {
    const found = await check();
    if (found) return found;
    assert.ok(Date.now() < deadline, `still waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function sign(secret, id, timestamp, body) {
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  return `v1,${createHmac("sha256", key).update(`${id}.${timestamp}.${body}`).digest("base64")}`;
}

const newSecret = () => `whsec_${randomBytes(32).toString("base64")}`;

test("execute and session call options are sent by their API names", async () => {
  const bodies = [];
  const capture = async (url, init) => {
    bodies.push(JSON.parse(init.body));
    return new Response(JSON.stringify({ request_id: "r", success: true, output: 1 }),
                        { status: 200, headers: { "Content-Type": "application/json" } });
  };
  const client = new Relay({ url: "http://127.0.0.1:9", apiKey: "k", fetch: capture });
  await client.execute("glyph://x", [1], {
    entrypoint: "run", environment: "pure", priority: "low", memoize: true, stepGas: 10,
    callbackUrl: "https://example.com/hook", callbackEvents: ["execution_complete"],
    maxGas: 1, maxMemory: 2, maxTime: 3, maxStack: 4, idempotencyKey: "k1" });
  assert.deepEqual(bodies[0], {
    cid: "glyph://x", entrypoint: "run", inputs: [1], environment: "pure", memoize: true,
    priority: "low", step_gas: 10, callback_url: "https://example.com/hook",
    callback_events: ["execution_complete"], idempotency_key: "k1",
    policy: { max_gas: 1, max_memory: 2, max_time: 3, max_stack: 4 } });
  await client.sessions.call("s", "add", [2], { maxStack: 8, stepGas: 5, priority: "high",
                                                callbackUrl: "https://example.com/c" });
  assert.deepEqual(Object.keys(bodies[1]).sort(),
                   ["callback_url", "entrypoint", "idempotency_key", "inputs", "policy",
                    "priority", "step_gas"]);
  assert.deepEqual(bodies[1].policy, { max_stack: 8 });
  // Fields by their API names still go as they are, and win.
  await client.execute("c", [], { step_gas: 7, idempotency_key: "k2", policy: { max_gas: 9 },
                                  maxGas: 1 });
  assert.equal(bodies[2].step_gas, 7);
  assert.equal(bodies[2].idempotency_key, "k2");
  assert.deepEqual(bodies[2].policy, { max_gas: 9 });
});

test("the gateway takes every execute and session call option", async () => {
  const { cid } = await relay.modules.push(ADD_WAT);
  const low = await relay.execute(cid, [1, 2], { priority: "low", memoize: true,
                                                 environment: "wasi", maxStack: 65536 });
  assert.equal(low.output, 3);
  const state = await relay.executions.get(low.request_id);
  assert.equal(state.priority, "low");
  assert.equal(state.environment.name, "wasi");
  const again = await relay.execute(cid, [1, 2], { memoize: true });
  assert.equal(again.cached, true);
  assert.equal(again.output, 3);

  const loop = await relay.modules.push(CALLING_LOOP_WAT);
  const handle = await relay.submit(loop.cid, [], { maxGas: 1e11, maxTime: 60_000,
                                                    stepGas: 100_000 });
  await until(async () => (await handle.get()).status === "paused", "a step pause");
  await handle.cancel();
  assert.equal((await handle.wait()).status, "cancelled");

  const counter = await relay.modules.push(COUNTER_WAT);
  const session = await relay.sessions.create(counter.cid, { budget: { max_calls: 1 } });
  const call = await relay.sessions.call(session.session_id, "add", [4],
                                         { priority: "high", maxStack: 65536, maxGas: 1e6 });
  assert.equal(call.output, 4);
  await assert.rejects(relay.sessions.call(session.session_id, "add", [1]),
                       (error) => error.status === 409 && error.slug === "session-exhausted");
  const raised = await relay.sessions.update(session.session_id, { budget: { max_calls: 5 } });
  assert.equal(raised.budget.max_calls, 5);
  assert.equal((await relay.sessions.call(session.session_id, "add", [1])).output, 5);
});

test("environments are listed, read, and changed by an administrator",
     { skip: !ADMIN_KEY && "RELAY_ADMIN_KEY is not set" }, async () => {
  const admin = new Relay({ url: URL_, apiKey: ADMIN_KEY });
  const names = (await relay.environments.list()).items.map((e) => e.name);
  assert.ok(names.includes("wasi") && names.includes("pure"), names.join(" "));
  assert.equal((await relay.environments.get("pure")).wasi.enabled, false);

  const made = await admin.environments.put("js-tight", { description: "small",
                                                           policy: { max_gas: 1_000_000 } });
  assert.equal(made.version, 1);
  assert.equal(made.policy.max_gas, 1_000_000);
  await assert.rejects(relay.environments.put("js-tight", { policy: { max_gas: 5 } }),
                       (error) => error instanceof RelayError && error.status === 403);

  const { cid } = await relay.modules.push(ADD_WAT);
  await assert.rejects(relay.execute(cid, [1, 2], { environment: "js-tight", maxGas: 5_000_000 }),
                       (error) => error.status === 400);
  const ran = await relay.execute(cid, [1, 2], { environment: "js-tight" });
  assert.equal(ran.output, 3);
  assert.deepEqual((await relay.executions.get(ran.request_id)).environment,
                   { name: "js-tight", version: 1 });

  // Sent back as read, with its version: a change since then is refused.
  const changed = await admin.environments.put("js-tight", { ...made, description: "smaller" });
  assert.equal(changed.version, 2);
  assert.equal((await relay.environments.get("js-tight")).description, "smaller");
  await assert.rejects(admin.environments.put("js-tight", { ...made, description: "stale" }),
                       (error) => error.status === 409);

  await assert.rejects(admin.environments.delete("wasi"), (error) => error.status === 409);
  await admin.environments.delete("js-tight");
  await assert.rejects(relay.environments.get("js-tight"), (error) => error.status === 404);
});

test("an access token opens the event stream by URL, without headers", async () => {
  const token = await relay.tokens.create();
  assert.equal(typeof token.access_token, "string");
  const expiresInS = (Date.parse(token.expires_at) - Date.now()) / 1000;
  assert.ok(expiresInS > 0 && expiresInS <= 301, token.expires_at);

  const { cid } = await relay.modules.push(ADD_WAT);
  const handle = await relay.submit(cid, [2, 2]);
  await handle.wait();
  const url = relay.eventsUrl({ requestId: handle.requestId, accessToken: token.access_token,
                                lastEventId: "0" });
  assert.ok(url.startsWith(`${relay.url}/intent/execute-wasm/events?`), url);
  const params = new URL(url).searchParams;
  assert.equal(params.get("access_token"), token.access_token);
  assert.equal(params.get("request_id"), handle.requestId);
  assert.equal(params.get("last_event_id"), "0");

  // What a browser's EventSource does: a GET of the URL and nothing else, no API key.
  const controller = new AbortController();
  const response = await fetch(url, { headers: { Accept: "text/event-stream" },
                                      signal: controller.signal });
  assert.equal(response.status, 200);
  const decoder = new SseDecoder();
  const types = [];
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (!types.includes("execution_complete")) {
    const { value, done } = await reader.read();
    assert.ok(!done, `the stream ended after ${types.join(" ")}`);
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      const event = decoder.feed(line.replace(/\r$/, ""));
      if (event) types.push(event.type);
    }
  }
  controller.abort();
  assert.equal(types[0], "execution_queued");

  assert.throws(() => relay.eventsUrl({ requestId: handle.requestId }), TypeError);
  // An API key is never accepted in a URL.
  const withKey = `${relay.url}/intent/execute-wasm/events?access_token=${process.env.RELAY_API_KEY}`;
  assert.equal((await fetch(withKey)).status, 401);
});

test("verifyWebhook accepts signatures made by node:crypto and refuses the rest", async () => {
  const secret = newSecret();
  const other = newSecret();
  const body = '{"type":"execution_complete","request_id":"r"}';
  const now = String(Math.floor(Date.now() / 1000));
  const headers = { "Webhook-Id": "msg_1", "Webhook-Timestamp": now,
                    "Webhook-Signature": `${sign(other, "msg_1", now, body)} `
                      + `${sign(secret, "msg_1", now, body)}` };
  assert.equal((await verifyWebhook(secret, headers, body)).request_id, "r");
  assert.equal((await verifyWebhook(other, new Headers(headers), new TextEncoder().encode(body)))
    .type, "execution_complete");
  assert.equal((await verifyWebhook(secret, headers, new TextEncoder().encode(body).buffer))
    .request_id, "r");

  const refused = async (promise, pattern) => assert.rejects(promise, (error) => {
    assert.ok(error instanceof WebhookVerificationError, String(error));
    assert.equal(error.name, "WebhookVerificationError");
    assert.match(error.message, pattern);
    return true;
  });
  await refused(verifyWebhook(newSecret(), headers, body), /no signature matches/);
  await refused(verifyWebhook(secret, headers, body.replace("complete", "error")),
                /no signature matches/);
  await refused(verifyWebhook(secret, { ...headers, "Webhook-Id": "msg_2" }, body),
                /no signature matches/);
  const v2 = sign(secret, "msg_1", now, body).replace(/^v1,/, "v2,");
  await refused(verifyWebhook(secret, { ...headers, "Webhook-Signature": v2 }, body),
                /no signature matches/);
  await refused(verifyWebhook(secret, {}, body), /webhook-id/);
  await refused(verifyWebhook(secret, { ...headers, "Webhook-Timestamp": "soon" }, body),
                /not a number/);

  const old = String(Math.floor(Date.now() / 1000) - 600);
  const stale = { "webhook-id": "msg_1", "webhook-timestamp": old,
                  "webhook-signature": sign(secret, "msg_1", old, body) };
  await refused(verifyWebhook(secret, stale, body), /timestamp/);
  assert.equal((await verifyWebhook(secret, stale, body, { toleranceS: 3600 })).request_id, "r");
});

test("verifyWebhook agrees with the Standard Webhooks reference library",
     { skip: !process.env.RELAY_TEST_WEBHOOK_VECTORS && "RELAY_TEST_WEBHOOK_VECTORS is not set" },
     async () => {
  const vectors = JSON.parse(process.env.RELAY_TEST_WEBHOOK_VECTORS);
  const { secret, other, body, fresh, stale } = vectors;
  assert.equal((await verifyWebhook(secret, fresh, body)).request_id, "r");
  assert.equal((await verifyWebhook(other, fresh, body)).type, "execution_complete");
  await assert.rejects(verifyWebhook(secret, stale, body),
                       (error) => error instanceof WebhookVerificationError
                         && /timestamp/.test(error.message));
  assert.equal((await verifyWebhook(secret, stale, body, { toleranceS: 3600 })).request_id, "r");
});

/** A webhook receiver on 127.0.0.1: every POST it gets, answered 200. */
async function receiver() {
  const got = [];
  const server = createServer((request, response) => {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => {
      got.push({ path: request.url, headers: request.headers, body: Buffer.concat(chunks) });
      response.end();
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { got, url: `http://127.0.0.1:${server.address().port}`,
           close: () => new Promise((resolve) => server.close(resolve)) };
}

test("webhook secrets, a signed delivery and its delivery log",
     { skip: !LOCAL_WEBHOOKS && "RELAY_TEST_LOCAL_WEBHOOKS is not set" }, async () => {
  const hooks = await receiver();
  try {
    const secret = await relay.webhooks.rotateSecret();
    assert.match(secret, /^whsec_[A-Za-z0-9+/]+=*$/);
    assert.equal(await relay.webhooks.secret(), secret);

    const { cid } = await relay.modules.push(ADD_WAT);
    const result = await relay.execute(cid, [1, 2], { callbackUrl: `${hooks.url}/execution` });
    const delivery = await until(() => hooks.got.find((d) => d.path === "/execution"),
                                 "the execution's delivery");
    const event = await verifyWebhook(secret, delivery.headers, delivery.body);
    assert.equal(event.type, "execution_complete");
    assert.equal(event.request_id, result.request_id);
    await assert.rejects(verifyWebhook(secret, delivery.headers,
                                       delivery.body.toString().replace("complete", "error")),
                         WebhookVerificationError);
    await assert.rejects(verifyWebhook(await relay.webhooks.rotateSecret(), delivery.headers,
                                       delivery.body), WebhookVerificationError);

    const logged = await until(async () => {
      const page = await relay.webhooks.deliveries(result.request_id);
      return page.items.find((d) => d.status_code === 200) && page;
    }, "the delivery log");
    assert.equal(logged.items[0].url, `${hooks.url}/execution`);
    assert.equal(logged.items[0].attempt, 1);
    assert.equal(logged.items[0].webhook_id, delivery.headers["webhook-id"]);
    assert.deepEqual((await relay.executions.deliveries(result.request_id)).items, logged.items);

    const pipeline = await relay.pipelines.create([{ id: "a", cid, inputs: [2, 2] }],
                                                  { callbackUrl: `${hooks.url}/pipeline` });
    await relay.pipelines.wait(pipeline.pipeline_id);
    const ended = await until(async () => {
      const page = await relay.webhooks.deliveries(null, { pipelineId: pipeline.pipeline_id });
      return page.items.find((d) => d.status_code === 200);
    }, "the pipeline's delivery log");
    assert.equal(ended.url, `${hooks.url}/pipeline`);
    const sent = hooks.got.find((d) => d.path === "/pipeline");
    assert.equal(JSON.parse(sent.body).type, "pipeline_complete");
    await assert.rejects(relay.webhooks.deliveries(), TypeError);
  } finally {
    await hooks.close();
  }
});
