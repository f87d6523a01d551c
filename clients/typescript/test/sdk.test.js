// The SDK against a real gateway, executor and Redis: started by
// tests/clients/test_typescript_sdk.py, which sets RELAY_URL and RELAY_API_KEY.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Relay, RelayError, newIdempotencyKey } from "../src/index.js";

const ADD_WAT = `(module (func (export "main") (param i32 i32) (result i32)
  local.get 0 local.get 1 i32.add))`;
const LOOP_WAT = `(module (func (export "main") (loop br 0)))`;
const CALLING_LOOP_WAT = `(module (func $tick) (func (export "main") (loop (call $tick) (br 0))))`;

const relay = new Relay({ url: process.env.RELAY_URL, apiKey: process.env.RELAY_API_KEY });

test("modules push, get and list", async () => {
  const module = await relay.modules.push(ADD_WAT, { name: "js-adder", tag: "v1" });
  assert.match(module.cid, /^b/);
  assert.deepEqual(module.exports,
                   [{ name: "main", params: ["i32", "i32"], results: ["i32"] }]);
  assert.equal((await relay.modules.get(module.cid)).cid, module.cid);
  const page = await relay.modules.list();
  assert.ok(page.items.some((m) => m.cid === module.cid));
  assert.equal((await relay.names.get("js-adder")).v1, module.cid);
});

test("execute answers the result", async () => {
  const { cid } = await relay.modules.push(ADD_WAT);
  const result = await relay.execute(cid, [2, 3]);
  assert.equal(result.success, true);
  assert.equal(result.output, 5);
  const byName = await relay.execute("glyph://js-adder@v1", [40, 2], { maxGas: 1_000_000 });
  assert.equal(byName.output, 42);
  const listed = await relay.executions.list({ status: "completed" });
  assert.ok(listed.items.some((e) => e.request_id === result.request_id));
});

test("a problem throws RelayError with its fields", async () => {
  const { cid } = await relay.modules.push(ADD_WAT);
  await assert.rejects(relay.execute(cid, [1, 2], { maxGas: -1 }), (error) => {
    assert.ok(error instanceof RelayError);
    assert.equal(error.status, 400);
    assert.match(error.type, /\/problems\//);
    assert.ok(error.title.length > 0);
    assert.ok(error.detail.length > 0);
    assert.ok(error.errors.some((e) => e.pointer === "/policy/max_gas"), JSON.stringify(error.errors));
    assert.ok(error.requestId);
    return true;
  });
  await assert.rejects(relay.executions.get("no-such-execution"),
                       (error) => error instanceof RelayError && error.status === 404
                         && error.slug === "not-found");
  const anonymous = new Relay({ url: process.env.RELAY_URL, apiKey: "wrong-key" });
  await assert.rejects(anonymous.modules.list(), (error) => error.status === 401);
});

test("submit, wait and the handle's events", async () => {
  const { cid } = await relay.modules.push(ADD_WAT);
  const handle = await relay.submit(cid, [20, 22]);
  const done = await handle.wait();
  assert.equal(done.output, 42);
  const types = [];
  for await (const event of handle.events()) types.push(event.type);
  assert.deepEqual(types.filter((t) => t !== "execution_progress"),
                   ["execution_queued", "execution_started", "execution_complete"]);
});

test("pause, resume and cancel follow the handle's events", async () => {
  const { cid } = await relay.modules.push(LOOP_WAT);
  const handle = await relay.submit(cid, [], { maxGas: 1e11, maxTime: 60_000 });
  await assert.rejects(handle.wait({ timeoutMs: 200 }), (error) => error.name === "TimeoutError");
  const types = [];
  for await (const event of handle.events()) {
    types.push(event.type);
    assert.equal(event.data.request_id, handle.requestId);
    if (event.type === "execution_started") await handle.pause();
    else if (event.type === "execution_paused") {
      assert.equal((await handle.get()).status, "paused");
      await handle.resume(1000);
    } else if (event.type === "execution_resumed") await handle.cancel();
  }
  assert.equal(types[0], "execution_queued");
  assert.equal(types.at(-1), "execution_error");
  for (const type of ["execution_started", "execution_paused", "execution_resumed"]) {
    assert.ok(types.includes(type), type);
  }
  const result = await handle.wait();
  assert.equal(result.status, "cancelled");
  assert.equal(result.error.code, "cancelled");
  await assert.rejects(handle.cancel(), (error) => error.status === 409);
});

test("step runs a paused execution by so much gas", async () => {
  const { cid } = await relay.modules.push(CALLING_LOOP_WAT);
  const handle = await relay.submit(cid, [], { maxGas: 1e11, maxTime: 60_000, step_gas: 100_000 });
  for await (const event of handle.events()) if (event.type === "execution_paused") break;
  const stepped = await handle.step(200_000);
  assert.equal(stepped.status, "paused");
  assert.ok(stepped.gas_used >= 300_000, String(stepped.gas_used));
  await handle.cancel();
  assert.equal((await handle.wait()).status, "cancelled");
});

test("the events iterator resumes by Last-Event-ID after a dropped connection", async () => {
  const { cid } = await relay.modules.push(ADD_WAT);
  const sent = [];
  let dropped = false;
  // A fetch that cuts the first stream after its first event: the SDK must reconnect.
  const cutting = async (url, init) => {
    const response = await fetch(url, init);
    if (!String(url).includes("/events")) return response;
    sent.push(init.headers["Last-Event-ID"] ?? null);
    if (dropped) return response;
    dropped = true;
    const reader = response.body.getReader();
    let text = "";
    const decoder = new TextDecoder();
    // Up to the end of the first message that carries an event (not a comment or retry).
    let end = -1;
    while (end < 0) {
      text += decoder.decode((await reader.read()).value, { stream: true });
      const data = text.indexOf("data:");
      end = data < 0 ? -1 : text.indexOf("\n\n", data);
    }
    reader.cancel();
    let first = text.slice(0, end + 2);
    return new Response(new ReadableStream({
      // The first read gets the event, the next one fails (an error at once would drop the
      // queued chunk).
      pull(controller) {
        if (first) {
          controller.enqueue(new TextEncoder().encode(first));
          first = "";
        } else {
          controller.error(new TypeError("connection reset"));
        }
      },
    }), { status: 200, headers: response.headers });
  };
  const client = new Relay({ url: process.env.RELAY_URL, apiKey: process.env.RELAY_API_KEY,
                             fetch: cutting });
  const handle = await client.submit(cid, [1, 1]);
  await handle.wait();
  const events = [];
  for await (const event of handle.events()) events.push(event);
  const types = events.map((e) => e.type).filter((t) => t !== "execution_progress");
  assert.deepEqual(types, ["execution_queued", "execution_started", "execution_complete"]);
  assert.equal(new Set(events.map((e) => e.id)).size, events.length, "an event repeated");
  assert.equal(sent[0], "0");
  assert.equal(sent[1], events[0].id);
});

test("a 429 rate-limited is retried with the same idempotency key", async () => {
  const { cid } = await relay.modules.push(ADD_WAT);
  const keys = [];
  let refused = false;
  const limited = async (url, init) => {
    if (init.method === "POST" && String(url).endsWith("/intent/execute-wasm")) {
      keys.push(JSON.parse(init.body).idempotency_key);
      if (!refused) {
        refused = true;
        return new Response(JSON.stringify({ type: "/problems/rate-limited", status: 429,
                                             title: "Too Many Requests", detail: "slow down" }),
                            { status: 429, headers: { "Content-Type": "application/problem+json",
                                                      "Retry-After": "0" } });
      }
    }
    return fetch(url, init);
  };
  const client = new Relay({ url: process.env.RELAY_URL, apiKey: process.env.RELAY_API_KEY,
                             fetch: limited });
  const result = await client.execute(cid, [3, 4]);
  assert.equal(result.output, 7);
  assert.equal(keys.length, 2);
  assert.equal(keys[0], keys[1]);
  assert.match(keys[0], /^relay-client-/);
  // Without retries the refusal is thrown as it is.
  refused = false;
  const once = new Relay({ url: process.env.RELAY_URL, apiKey: process.env.RELAY_API_KEY,
                           fetch: limited, retries: 0 });
  await assert.rejects(once.execute(cid, [3, 4]), (error) => error.status === 429
                       && error.slug === "rate-limited");
});

test("a budget's 429 is not retried", async () => {
  let calls = 0;
  const exhausted = async () => {
    calls += 1;
    return new Response(JSON.stringify({ type: "/problems/budget-exhausted", status: 429,
                                         title: "Budget exhausted", detail: "no" }),
                        { status: 429, headers: { "Retry-After": "1" } });
  };
  const client = new Relay({ url: "http://127.0.0.1:9", apiKey: "k", fetch: exhausted });
  await assert.rejects(client.execute("bafy", []), (error) => error.slug === "budget-exhausted");
  assert.equal(calls, 1);
});

test("idempotency keys are fresh and URL-safe", () => {
  const keys = new Set(Array.from({ length: 100 }, () => newIdempotencyKey()));
  assert.equal(keys.size, 100);
  for (const key of keys) assert.match(key, /^relay-client-[0-9a-f]{32}$/);
});
