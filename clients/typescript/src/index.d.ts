// Type declarations of Relay's JavaScript SDK (src/index.js), written by hand: no build step.
// Results are the gateway's JSON bodies as they are (snake_case fields, see /openapi.json);
// the types below name the fields the SDK relies on and allow any other.

export declare const VERSION: string;

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface RelayOptions {
  /** The gateway's URL; default RELAY_URL (Node), then http://127.0.0.1:8000. */
  url?: string;
  /** Sent as X-API-Key; default RELAY_API_KEY (Node). */
  apiKey?: string;
  /** The fetch to use (default globalThis.fetch): a wrapper can log, proxy or test. */
  fetch?: typeof globalThis.fetch;
  /** Times a request is sent again after a network error, a 503 or a 429 rate-limited. */
  retries?: number;
  /** Extra headers sent with every request. */
  headers?: Record<string, string>;
}

export interface RequestOptions {
  json?: unknown;
  body?: BodyInit;
  headers?: Record<string, string>;
  params?: Record<string, string | number | boolean | string[] | undefined | null>;
  /** Repeating the request cannot do anything twice: it may be retried after a network error. */
  safe?: boolean;
  signal?: AbortSignal;
}

export interface ProblemError {
  pointer: string;
  detail: string;
  [key: string]: unknown;
}

/** A request Relay refused or could not answer (status 0: no answer came). */
export declare class RelayError extends Error {
  constructor(fields: {
    status: number; type?: string; title?: string; detail?: string; errors?: ProblemError[];
    requestId?: string | null; headers?: Record<string, string>; body?: Record<string, unknown>;
  });
  readonly name: "RelayError";
  status: number;
  /** The problem's type URI, such as /problems/rate-limited. */
  type: string;
  title: string;
  detail: string;
  errors: ProblemError[];
  requestId: string | null;
  headers: Record<string, string>;
  body: Record<string, unknown>;
  /** The last part of type: rate-limited, not-found, ... */
  readonly slug: string;
  static fromResponse(response: Response): Promise<RelayError>;
  static fromTransport(error: unknown): RelayError;
}

export interface ExecutionFailure {
  code: string;
  message: string;
  frames?: { func_index: number; func_name: string | null; module_offset: number }[];
}

export type ExecutionStatus = "queued" | "running" | "paused" | "completed" | "failed" | "cancelled";

export interface Execution {
  request_id: string;
  status?: ExecutionStatus;
  success?: boolean;
  cid?: string;
  output?: Json;
  gas_used?: number;
  duration?: number;
  error?: ExecutionFailure | null;
  [key: string]: unknown;
}

export interface RelayEvent {
  /** The stream's event id (the Last-Event-ID to resume after it). */
  id: string;
  /** execution_queued, execution_started, execution_progress, execution_complete, ... */
  type: string;
  data: { type: string; request_id?: string; [key: string]: unknown };
}

export interface Page<T> {
  items: T[];
  nextCursor: string | null;
}

export interface ListOptions {
  limit?: number;
  cursor?: string;
}

export type Priority = "high" | "normal" | "low";

/** The options an execute and a session call share. */
export interface CallOptions {
  /** Fuel (wasmtime gas). */
  maxGas?: number;
  /** Bytes of all linear memories. */
  maxMemory?: number;
  /** Wall-clock milliseconds of running (paused time does not count). */
  maxTime?: number;
  /** Bytes of wasm stack. */
  maxStack?: number;
  /** Default: one generated per call, reused by its retries. */
  idempotencyKey?: string;
  /** Pause in place after this much more gas (then `step()` or `resume()`). */
  stepGas?: number;
  /** At most the principal's max_priority; default normal. */
  priority?: Priority;
  /** POST the execution's events there, signed (see verifyWebhook). */
  callbackUrl?: string;
  /** Default ["execution_complete", "execution_error"]. */
  callbackEvents?: string[];
  /** Other request fields as the API names them (snake_case), sent as they are. */
  [field: string]: unknown;
}

export interface ExecuteOptions extends CallOptions {
  entrypoint?: string;
  /** The environment to run in (default the gateway's RELAY_DEFAULT_ENVIRONMENT, `wasi`). */
  environment?: string;
  /** Answer a stored result of the same computation when one fits (`cached: true`). */
  memoize?: boolean;
}

export interface EventsUrlOptions {
  requestId?: string | string[];
  sessionId?: string;
  pipelineId?: string;
  /** access_token from tokens.create(): required, an API key never goes in a URL. */
  accessToken: string;
  /** Start after this event ("0": every event retained). */
  lastEventId?: string;
}

export interface EventsOptions {
  requestId?: string | string[];
  sessionId?: string;
  pipelineId?: string;
  /** Start after this event ("0": every event retained). */
  lastEventId?: string;
  signal?: AbortSignal;
}

export interface Module {
  cid: string;
  size: number;
  exports: { name: string; params: string[]; results: string[] }[];
  imports: { module: string; name: string; kind?: string }[];
  [key: string]: unknown;
}

type Body = Record<string, unknown>;

export declare class Relay {
  constructor(options?: RelayOptions);
  readonly url: string;
  readonly apiKey: string | null;
  readonly retries: number;
  readonly modules: Modules;
  readonly names: Names;
  readonly executions: Executions;
  readonly sessions: Sessions;
  readonly snapshots: Snapshots;
  readonly budgets: Budgets;
  readonly batches: Batches;
  readonly pipelines: Pipelines;
  readonly environments: Environments;
  readonly webhooks: Webhooks;
  readonly tokens: Tokens;
  /** One request with the client's retries; rejects with RelayError for an error answer. */
  request(method: string, path: string, options?: RequestOptions): Promise<Response>;
  json<T = unknown>(method: string, path: string, options?: RequestOptions): Promise<T>;
  /** Run ref (a CID or glyph://NAME@TAG) and answer its result once finished. */
  execute(ref: string, inputs?: Json[], options?: ExecuteOptions): Promise<Execution>;
  /** Queue an execution; the handle follows and controls it. */
  submit(ref: string, inputs?: Json[], options?: ExecuteOptions): Promise<ExecutionHandle>;
  handle(requestId: string): ExecutionHandle;
  /** The caller's events, live, resuming by Last-Event-ID after a dropped connection. */
  events(options?: EventsOptions): AsyncGenerator<RelayEvent, void, undefined>;
  /**
   * The absolute event stream URL for a browser's EventSource (which cannot send headers),
   * carrying ?access_token=; throws a TypeError without accessToken.
   */
  eventsUrl(options: EventsUrlOptions): string;
}

export declare class ExecutionHandle {
  constructor(relay: Relay, requestId: string);
  readonly relay: Relay;
  readonly requestId: string;
  get(): Promise<Execution>;
  events(options?: { signal?: AbortSignal }): AsyncGenerator<RelayEvent, void, undefined>;
  /** Its result once finished; rejects with an Error named TimeoutError after timeoutMs. */
  wait(options?: { timeoutMs?: number }): Promise<Execution>;
  pause(): Promise<void>;
  resume(additionalGas?: number): Promise<void>;
  step(gas?: number): Promise<Execution>;
  cancel(): Promise<void>;
}

export declare class Modules {
  /** Upload wasm bytes or WAT text; with name (and tag, default latest) bind glyph://name@tag. */
  push(source: Uint8Array | ArrayBuffer | string, options?: { name?: string; tag?: string }):
    Promise<Module>;
  get(cid: string): Promise<Module>;
  list(options?: ListOptions): Promise<Page<Module>>;
  wasm(cid: string): Promise<Uint8Array>;
  delete(cid: string): Promise<void>;
}

export declare class Names {
  set(name: string, tag: string, cid: string): Promise<Body>;
  /** The tags of name, each with the CID it names. */
  get(name: string): Promise<Record<string, string>>;
}

export declare class Executions {
  get(requestId: string): Promise<Execution>;
  list(options?: ListOptions & { status?: ExecutionStatus; sessionId?: string;
                                 pipelineId?: string; batchId?: string }): Promise<Page<Execution>>;
  output(requestId: string): Promise<Uint8Array>;
  /** Every webhook delivery attempt of the execution's events. */
  deliveries(requestId: string, options?: ListOptions): Promise<Page<Delivery>>;
  cancel(requestId: string): Promise<void>;
  pause(requestId: string): Promise<void>;
  resume(requestId: string, additionalGas?: number): Promise<void>;
  step(requestId: string, gas?: number): Promise<Execution>;
}

export interface SessionBudget { max_gas?: number; max_time?: number; max_calls?: number }

export declare class Sessions {
  create(cid: string, options?: { environment?: string; budget?: SessionBudget; ttl?: number }):
    Promise<Body>;
  /** The call's result (with state_cid) once its state is committed. */
  call(sessionId: string, entrypoint: string, inputs?: Json[], options?: CallOptions):
    Promise<Execution>;
  get(sessionId: string): Promise<Body>;
  /** PATCH new budget totals. */
  update(sessionId: string, changes: { budget: SessionBudget }): Promise<Body>;
  list(options?: ListOptions): Promise<Page<Body>>;
  close(sessionId: string): Promise<void>;
  pause(sessionId: string): Promise<void>;
  resume(sessionId: string, additionalGas?: number): Promise<void>;
  step(sessionId: string, gas?: number): Promise<Execution>;
  snapshot(sessionId: string, label?: string): Promise<Body>;
}

export declare class Snapshots {
  create(sessionId: string, label?: string): Promise<Body>;
  get(snapshotId: string): Promise<Body>;
  list(options?: ListOptions): Promise<Page<Body>>;
  delete(snapshotId: string): Promise<void>;
  restore(snapshotId: string, options?: { branchCount?: number; budget?: SessionBudget }):
    Promise<Body[]>;
}

export interface BudgetLimits {
  principal?: string;
  window?: number;
  maxGas?: number;
  maxTime?: number;
  maxExecutions?: number;
}

export declare class Budgets {
  create(limits?: BudgetLimits): Promise<Body>;
  get(budgetId: string): Promise<Body>;
  list(options?: ListOptions): Promise<Page<Body>>;
  update(budgetId: string, limits?: BudgetLimits): Promise<Body>;
  delete(budgetId: string): Promise<void>;
  usage(budgetId: string): Promise<Body>;
}

export declare class Batches {
  run(items: Body[], options?: { callbackUrl?: string; wait?: boolean }): Promise<Body>;
  get(batchId: string): Promise<Body>;
}

export declare class Pipelines {
  create(nodes: Body[], options?: { maxConcurrency?: number; failFast?: boolean;
                                    callbackUrl?: string; callbackEvents?: string[];
                                    idempotencyKey?: string; [field: string]: unknown }):
    Promise<Body>;
  get(pipelineId: string): Promise<Body>;
  list(options?: ListOptions): Promise<Page<Body>>;
  delete(pipelineId: string): Promise<void>;
  wait(pipelineId: string, options?: { onProgress?: (event: RelayEvent) => void }): Promise<Body>;
}

export interface EnvironmentPolicy {
  max_gas?: number;
  max_memory?: number;
  max_time?: number;
  max_stack?: number;
}

export interface EnvironmentWasi {
  enabled?: boolean;
  env?: Record<string, string>;
  args?: string[];
  clock?: boolean;
  random?: boolean;
}

/** What PUT /environments/{name} takes; omitted caps are the global ceilings. */
export interface EnvironmentDefinition {
  name?: string;
  /** The version it was read at: a concurrent change since is 409. */
  version?: number;
  description?: string;
  policy?: EnvironmentPolicy;
  wasi?: EnvironmentWasi;
  max_output_bytes?: number;
}

export interface Environment {
  name: string;
  version: number;
  description: string;
  policy: Required<EnvironmentPolicy>;
  wasi: Required<EnvironmentWasi>;
  max_output_bytes: number;
  [key: string]: unknown;
}

export declare class Environments {
  list(options?: ListOptions): Promise<Page<Environment>>;
  get(name: string): Promise<Environment>;
  /** Create or replace (administrators only); each PUT raises version. */
  put(name: string, definition?: EnvironmentDefinition): Promise<Environment>;
  /** Administrators only; a shipped one is 409. */
  delete(name: string): Promise<void>;
}

/** One delivery attempt of a webhook. */
export interface Delivery {
  webhook_id: string;
  url: string;
  attempt: number;
  status_code: number | null;
  error: string | null;
  at: string;
  next_attempt_at: string | null;
  [key: string]: unknown;
}

export declare class Webhooks {
  /** The current whsec_… secret. */
  secret(): Promise<string>;
  /** A new secret; deliveries carry both signatures for the grace period. */
  rotateSecret(): Promise<string>;
  /** An execution's delivery attempts, or a pipeline's with pipelineId (then requestId is ignored). */
  deliveries(requestId: string, options?: ListOptions): Promise<Page<Delivery>>;
  deliveries(requestId: string | null | undefined,
             options: ListOptions & { pipelineId: string }): Promise<Page<Delivery>>;
}

export interface AccessToken {
  access_token: string;
  /** RFC 3339 UTC. */
  expires_at: string;
}

export declare class Tokens {
  /** A short-lived, subscribe-only token for eventsUrl. */
  create(): Promise<AccessToken>;
}

/** A webhook delivery whose signature or timestamp does not hold. */
export declare class WebhookVerificationError extends Error {
  constructor(message: string);
  readonly name: "WebhookVerificationError";
}

/** The headers of a delivery: a fetch Headers, or an object (node:http's) in any case. */
export type WebhookHeaders = Headers | Record<string, string | string[] | undefined>;

/**
 * Check a delivery (Standard Webhooks 1.0: HMAC-SHA256, v1 signatures) against the secret and
 * answer its JSON event; rejects with WebhookVerificationError on no matching signature, a
 * missing header, or a webhook-timestamp more than toleranceS (default 300) seconds from now.
 * Pass the raw body as received.
 */
export declare function verifyWebhook<T = RelayEvent["data"]>(
  secret: string, headers: WebhookHeaders, body: string | Uint8Array | ArrayBuffer,
  options?: { toleranceS?: number }): Promise<T>;

export declare class SseDecoder {
  lastId: string | null;
  retryMs: number | null;
  /** The event that line completes, if any. */
  feed(line: string): RelayEvent | null;
}

export declare function backoffMs(attempt: number): number;
export declare function newIdempotencyKey(): string;
