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

export interface ExecuteOptions {
  entrypoint?: string;
  maxGas?: number;
  maxMemory?: number;
  maxTime?: number;
  maxStack?: number;
  /** Default: one generated per call, reused by its retries. */
  idempotencyKey?: string;
  /** Other request fields as the API names them: environment, priority, step_gas, ... */
  [field: string]: unknown;
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
  cancel(requestId: string): Promise<void>;
  pause(requestId: string): Promise<void>;
  resume(requestId: string, additionalGas?: number): Promise<void>;
  step(requestId: string, gas?: number): Promise<Execution>;
}

export interface SessionBudget { max_gas?: number; max_time?: number; max_calls?: number }

export declare class Sessions {
  create(cid: string, options?: { environment?: string; budget?: SessionBudget; ttl?: number }):
    Promise<Body>;
  call(sessionId: string, entrypoint: string, inputs?: Json[],
       options?: Omit<ExecuteOptions, "entrypoint" | "maxStack">): Promise<Execution>;
  get(sessionId: string): Promise<Body>;
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
                                    idempotencyKey?: string; [field: string]: unknown }):
    Promise<Body>;
  get(pipelineId: string): Promise<Body>;
  list(options?: ListOptions): Promise<Page<Body>>;
  delete(pipelineId: string): Promise<void>;
  wait(pipelineId: string, options?: { onProgress?: (event: RelayEvent) => void }): Promise<Body>;
}

export declare class SseDecoder {
  lastId: string | null;
  retryMs: number | null;
  /** The event that line completes, if any. */
  feed(line: string): RelayEvent | null;
}

export declare function backoffMs(attempt: number): number;
export declare function newIdempotencyKey(): string;
