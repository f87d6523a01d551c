// Sessions, snapshots, batches and pipelines through the SDK, against a real gateway (see
// sdk.test.js for how it is started).
import assert from "node:assert/strict";
import { test } from "node:test";
import { Relay, RelayError } from "../src/index.js";

const ADD_WAT = `(module (func (export "main") (param i32 i32) (result i32)
  local.get 0 local.get 1 i32.add))`;
const COUNTER_WAT = `(module
  (global $n (mut i64) (i64.const 0))
  (func (export "add") (param i64) (result i64)
    (global.set $n (i64.add (global.get $n) (local.get 0)))
    (global.get $n)))`;

const relay = new Relay({ url: process.env.RELAY_URL, apiKey: process.env.RELAY_API_KEY });

test("sessions, snapshots and branches", async () => {
  const { cid } = await relay.modules.push(COUNTER_WAT);
  const session = await relay.sessions.create(cid, { budget: { max_calls: 20 } });
  assert.equal(session.status, "idle");
  assert.equal((await relay.sessions.call(session.session_id, "add", [5])).output, 5);
  const second = await relay.sessions.call(session.session_id, "add", [2]);
  assert.equal(second.output, 7);
  assert.equal((await relay.sessions.get(session.session_id)).calls, 2);
  assert.ok((await relay.sessions.list()).items.some((s) => s.session_id === session.session_id));

  const snapshot = await relay.snapshots.create(session.session_id, "seven");
  assert.equal(snapshot.state_cid, second.state_cid);
  assert.equal((await relay.snapshots.get(snapshot.snapshot_id)).label, "seven");
  const branches = await relay.snapshots.restore(snapshot.snapshot_id, { branchCount: 3 });
  assert.equal(new Set(branches.map((b) => b.session_id)).size, 3);
  for (const [n, branch] of branches.entries()) {
    assert.equal((await relay.sessions.call(branch.session_id, "add", [n])).output, 7 + n);
  }

  await relay.sessions.close(session.session_id);
  await assert.rejects(relay.sessions.call(session.session_id, "add", [1]),
                       (error) => error instanceof RelayError && error.status === 409
                         && error.slug === "session-closed");
  await relay.snapshots.delete(snapshot.snapshot_id);
  await assert.rejects(relay.snapshots.get(snapshot.snapshot_id), (error) => error.status === 404);
});

test("batches run and get", async () => {
  const { cid } = await relay.modules.push(ADD_WAT);
  const ran = await relay.batches.run([{ cid, inputs: [1, 2] },
                                       { cid, inputs: [1, 2], policy: { max_gas: 0 } }]);
  assert.equal(ran.results[0].output, 3);
  assert.equal(ran.results[1].status, 400);
  const queued = await relay.batches.run([0, 1, 2].map((n) => ({ cid, inputs: [n, n] })),
                                         { wait: false });
  let batch;
  for (let i = 0; (batch = await relay.batches.get(queued.batch_id)).status !== "completed"; i++) {
    assert.ok(i < 400, `batch still ${batch.status}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.deepEqual(batch.items.map((item) => item.status), ["completed", "completed", "completed"]);
  assert.equal((await relay.executions.list({ batchId: queued.batch_id })).items.length, 3);
});

test("pipelines run and wait with progress", async () => {
  const { cid } = await relay.modules.push(ADD_WAT);
  const progress = [];
  const pipeline = await relay.pipelines.create([
    { id: "a", cid, inputs: [1, 2] },
    { id: "b", cid, inputs: [{ $ref: "a" }, 10] }]);
  assert.equal(pipeline.status, "running");
  const done = await relay.pipelines.wait(pipeline.pipeline_id,
                                          { onProgress: (event) => progress.push(event) });
  assert.equal(done.status, "completed");
  assert.equal(done.nodes.b.output, 13);
  const seen = new Set(progress.map((e) => `${e.data.node}:${e.data.node_status}`));
  assert.ok(seen.has("a:completed") && seen.has("b:completed"), [...seen].join(" "));
  assert.ok((await relay.pipelines.list()).items.some((p) => p.pipeline_id === pipeline.pipeline_id));
});
