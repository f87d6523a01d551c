// Compiled, never run, by `tsc --noEmit --strict` (tests/clients/test_typescript_sdk.py): a
// program that uses the SDK the way its users do, so that index.d.ts must declare every part
// with the right types. Each @ts-expect-error marks a misuse the declarations must refuse:
// if they grew too loose to catch it, the unused directive fails the compile.
import {
  type AccessToken,
  type Delivery,
  type Environment,
  type Execution,
  type ExecutionHandle,
  type Page,
  type RelayEvent,
  Relay,
  RelayError,
  SseDecoder,
  VERSION,
  WebhookVerificationError,
  backoffMs,
  newIdempotencyKey,
  verifyWebhook,
} from "../src/index.js";

export async function uses(): Promise<void> {
  const relay = new Relay({ url: "http://127.0.0.1:8000", apiKey: "k", retries: 2,
                            headers: { "User-Agent": "types-check" } });
  const version: string = VERSION;
  const wait: number = backoffMs(1);
  const key: string = newIdempotencyKey();

  const module = await relay.modules.push("(module)", { name: "x", tag: "v1" });
  const cid: string = module.cid;
  const bytes: Uint8Array = await relay.modules.wasm(cid);
  const tags: Record<string, string> = await relay.names.get("x");

  const result: Execution = await relay.execute(cid, [1, 2], {
    entrypoint: "main", maxGas: 1_000_000, maxMemory: 65536, maxTime: 5000, maxStack: 65536,
    environment: "pure", priority: "high", memoize: true, stepGas: 100,
    callbackUrl: "https://example.com/hook", callbackEvents: ["execution_complete"],
    idempotencyKey: key,
  });
  const ok: boolean | undefined = result.success;
  // @ts-expect-error: priority is one of high, normal, low
  await relay.execute(cid, [], { priority: "urgent" });
  // @ts-expect-error: memoize is a boolean
  await relay.execute(cid, [], { memoize: "yes" });
  // @ts-expect-error: inputs are JSON values
  await relay.execute(cid, [() => 1]);

  const handle: ExecutionHandle = await relay.submit(cid, [], { stepGas: 10 });
  const stepped: Execution = await handle.step(100);
  await handle.resume(1000);
  const done: Execution = await handle.wait({ timeoutMs: 1000 });
  for await (const event of handle.events()) {
    const type: string = event.type;
    const id: string = event.id;
  }
  for await (const event of relay.events({ requestId: [handle.requestId], lastEventId: "0" })) {
    const seen: RelayEvent = event;
  }
  const deliveries: Page<Delivery> = await relay.executions.deliveries(handle.requestId,
                                                                      { limit: 10 });
  const status: number | null = deliveries.items[0].status_code;

  const session = await relay.sessions.create(cid, { environment: "wasi",
                                                     budget: { max_calls: 3 } });
  const call: Execution = await relay.sessions.call(String(session.session_id), "add", [1], {
    maxGas: 1000, maxStack: 65536, stepGas: 10, priority: "low", callbackUrl: "https://x/",
  });
  await relay.sessions.update(String(session.session_id), { budget: { max_calls: 10 } });
  // @ts-expect-error: a budget is needed
  await relay.sessions.update("s", {});

  const environments: Page<Environment> = await relay.environments.list({ limit: 5 });
  const pure: Environment = await relay.environments.get("pure");
  const wasiOn: boolean = pure.wasi.enabled;
  const maxGas: number = pure.policy.max_gas;
  const changed: Environment = await relay.environments.put("tight", {
    version: pure.version, description: "small", policy: { max_gas: 1000 },
    wasi: { enabled: false, env: { A: "1" }, args: ["x"] }, max_output_bytes: 1024,
  });
  // @ts-expect-error: version is a number
  await relay.environments.put("tight", { version: "1" });
  await relay.environments.delete("tight");

  const secret: string = await relay.webhooks.secret();
  const rotated: string = await relay.webhooks.rotateSecret();
  const log: Page<Delivery> = await relay.webhooks.deliveries(handle.requestId);
  const pipelineLog: Page<Delivery> = await relay.webhooks.deliveries(null,
                                                                     { pipelineId: "p" });
  // @ts-expect-error: without a pipelineId, a requestId is needed
  await relay.webhooks.deliveries(null);

  const token: AccessToken = await relay.tokens.create();
  const expires: string = token.expires_at;
  const url: string = relay.eventsUrl({ requestId: handle.requestId,
                                        accessToken: token.access_token, lastEventId: "0" });
  // @ts-expect-error: an access token is required
  relay.eventsUrl({ requestId: handle.requestId });
  const source = new EventSource(url);
  source.onmessage = (message) => JSON.parse(message.data as string);

  const headers = new Headers({ "webhook-id": "m" });
  const event = await verifyWebhook(secret, headers, new Uint8Array(), { toleranceS: 60 });
  const eventType: string = event.type;
  const typed = await verifyWebhook<{ type: "pipeline_complete"; pipeline_id: string }>(
    secret, { "webhook-id": "m", "webhook-signature": ["v1,x"] }, "{}");
  const pipelineId: string = typed.pipeline_id;
  // @ts-expect-error: verifyWebhook is async (WebCrypto): its answer is a promise
  const notAwaited: { type: string } = verifyWebhook(secret, headers, "{}");
  // @ts-expect-error: the tolerance is in seconds, a number
  await verifyWebhook(secret, headers, "{}", { toleranceS: "5m" });

  try {
    await relay.pipelines.create([{ id: "a", cid, inputs: [] }],
                                 { maxConcurrency: 2, callbackUrl: "https://x/",
                                   callbackEvents: ["pipeline_complete"] });
  } catch (error) {
    if (error instanceof RelayError) {
      const slug: string = error.slug;
      const pointers: string[] = error.errors.map((e) => e.pointer);
    } else if (error instanceof WebhookVerificationError) {
      const name: "WebhookVerificationError" = error.name;
    }
  }
  const decoder = new SseDecoder();
  const parsed: RelayEvent | null = decoder.feed("data: {}");
}
