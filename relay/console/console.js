// Relay's web console: a page of plain DOM code on the JavaScript SDK (relay-client.js, the same
// file as clients/typescript/src/index.js). It keeps the API key in sessionStorage, so the key
// lives as long as the tab and is sent only to this gateway. No inline script, no innerHTML with
// data: every value from the API is set as text, so a module's output cannot inject markup.
import { Relay, RelayError } from "./relay-client.js";

const KEY_STORAGE = "relay.apiKey";
const MAX_LOG_LINES = 500;
const MAX_DRAWN_NODES = 400;
const FINISHED = new Set(["completed", "failed", "cancelled"]);
// The gateway's own URL: this page is <gateway>/console.
const GATEWAY = new URL(".", location.href).href.replace(/\/$/, "");

const $ = (id) => document.getElementById(id);
let relay = null;
let loaded = null;          // the module shown in the Module card
let following = null;       // AbortController of the execution shown
let followingPipeline = null;
let shownSession = null;
let shownPipeline = null;
let focusBeforeProblem = null;
let executionsCursor = null;  // the next page of each list ("Show more")
let pipelinesCursor = null;

// ---------------------------------------------------------------- small helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

const svg = (tag, attributes = {}) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
};

function statusBadge(status) {
  return el("span", { class: `status s-${status}` }, status);
}

function linkButton(text, onclick, label) {
  return el("button", { type: "button", class: "link", onclick, "aria-label": label ?? text }, text);
}

const short = (id) => (id && id.length > 20 ? `${id.slice(0, 10)}…${id.slice(-6)}` : id ?? "");
const json = (value) => JSON.stringify(value, null, 2);
const numberOf = (input) => (input.value.trim() === "" ? undefined : Number(input.value));

/** Run `action`, showing any failure as a problem (title, status, detail, field errors). */
async function attempt(action) {
  try {
    return await action();
  } catch (error) {
    if (error?.name === "AbortError") return undefined;
    showProblem(error);
    return undefined;
  }
}

/** `request(client)` with the signed-in client, as `attempt`; undefined as well when the user
 * signed out (or in again) while it was on its way: an answer for someone else is dropped. */
async function fetchFor(request) {
  const client = relay;
  const answer = await attempt(() => request(client));
  return client === relay ? answer : undefined;
}

/** A list's page into `tbody`: replacing it, or after its rows (`more`); the "Show more"
 * button `more-button` shows while there is a next page, whose cursor it returns. */
function showPage(tbody, page, { more, row, empty, columns, moreButton }) {
  const rows = page.items.map(row);
  if (more) $(tbody).append(...rows);
  else if (rows.length) $(tbody).replaceChildren(...rows);
  else $(tbody).replaceChildren(el("tr", {}, el("td", { colspan: columns, class: "muted" }, empty)));
  $(moreButton).hidden = !page.nextCursor;
  return page.nextCursor;
}

function showProblem(error) {
  const box = $("problem");
  const relayError = error instanceof RelayError;
  box.querySelector(".title").textContent = relayError ? error.title || "Request failed"
    : error.title || "Something went wrong";
  box.querySelector(".status").textContent = relayError && error.status ? `(${error.status})` : "";
  box.querySelector(".detail").textContent = error.detail ?? error.message ?? String(error);
  const list = box.querySelector(".errors");
  list.replaceChildren(...(error.errors ?? []).map(
    (item) => el("li", {}, el("code", {}, item.pointer ?? ""), " ", item.detail ?? "")));
  if (!box.contains(document.activeElement)) focusBeforeProblem = document.activeElement;
  box.hidden = false;
  box.querySelector(".dismiss").focus();
}

/** A problem found before anything was sent (the same box as the gateway's problems). */
function localProblem(title, detail) {
  return Object.assign(new Error(detail), { title, detail });
}

/** Hide the problem; if it had the focus, give it back to where it was (when still shown). */
function hideProblem() {
  const box = $("problem");
  const focused = box.contains(document.activeElement);
  box.hidden = true;
  const before = focusBeforeProblem;
  focusBeforeProblem = null;
  if (focused && before?.isConnected && before.checkVisibility()) before.focus();
}

// ---------------------------------------------------------------- sign in

async function signIn(apiKey) {
  const candidate = new Relay({ url: GATEWAY, apiKey, retries: 1 });
  await candidate.modules.list({ limit: 1 });   // a bad key is a 401 here, shown as a problem
  relay = candidate;
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  $("api-key").value = "";   // the key lives in sessionStorage only, not in the page
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = `Signed in to ${GATEWAY}`;
  hideProblem();
  selectTab(location.hash.slice(1) || "run");
}

function signOut() {
  sessionStorage.removeItem(KEY_STORAGE);
  following?.abort();
  followingPipeline?.abort();
  relay = null;
  forget();
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("sign-in").hidden = false;
  $("api-key").value = "";
  $("api-key").focus();
}

/** Clear every view: what one principal saw must not show (nor hide in the page) for the
 * next one to sign in on this tab, whose requests on its ids would be 404s anyway. */
function forget() {
  loaded = null;
  shownSession = null;
  shownPipeline = null;
  for (const id of ["module", "run-form", "execution", "session", "pipeline", "executions-more",
    "pipelines-more"]) $(id).hidden = true;
  executionsCursor = null;
  pipelinesCursor = null;
  for (const id of ["module-exports", "module-imports", "entrypoint", "stdout", "events",
    "executions-list", "sessions-list", "session-facts", "snapshots", "pipelines-list",
    "pipeline-nodes-list", "graph"]) $(id).replaceChildren();
  for (const id of ["module-cid", "module-size", "module-wasi", "execution-id", "result", "gas",
    "session-id", "pipeline-id", "pipeline-status"]) $(id).textContent = "";
  $("target").replaceChildren(el("option", { value: "" }, "a new execution"));
  for (const form of $("app").querySelectorAll("form")) form.reset();
  for (const id of ["ref", "step-by", "snapshot-label", "pipeline-nodes"]) $(id).value = "";
  $("progress").value = 0;
  $("pipeline-progress").value = 0;
  hideProblem();
  history.replaceState(null, "", location.pathname + location.search);
}

// ---------------------------------------------------------------- tabs

const TABS = ["run", "executions", "sessions", "pipelines"];
const REFRESH = { executions: refreshExecutions, sessions: refreshSessions,
                  pipelines: refreshPipelines };

function selectTab(name, { focus = true } = {}) {
  if (!TABS.includes(name)) name = "run";
  for (const tab of TABS) {
    const selected = tab === name;
    const button = $(`tab-${tab}`);
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    $(tab).hidden = !selected;
    if (selected && focus) button.focus();
  }
  if (location.hash.slice(1) !== name) history.replaceState(null, "", `#${name}`);
  REFRESH[name]?.();
}

function onTabKey(event) {
  const index = TABS.indexOf(event.target.id.replace("tab-", ""));
  const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -index, End: TABS.length - 1 - index };
  if (!(event.key in moves)) return;
  event.preventDefault();
  selectTab(TABS[(index + moves[event.key] + TABS.length) % TABS.length]);
}

// ---------------------------------------------------------------- modules

async function upload(file) {
  if (!file) return;
  const bytes = new Uint8Array(await file.arrayBuffer());
  const info = await attempt(() => relay.modules.push(bytes));
  if (info) showModule(info);
}

async function loadReference(reference) {
  let cid = reference.trim();
  const glyph = /^glyph:\/\/([^@]+)(?:@(.+))?$/.exec(cid);
  if (glyph) {
    const tags = await relay.names.get(glyph[1]);
    cid = Object.hasOwn(tags, glyph[2] ?? "latest") ? tags[glyph[2] ?? "latest"] : undefined;
    if (!cid) {
      throw localProblem("No such tag", `${glyph[1]} has no tag ${glyph[2] ?? "latest"}`
                         + ` (it has: ${Object.keys(tags).join(", ") || "none"})`);
    }
  }
  showModule(await relay.modules.get(cid));
}

function signature(item) {
  return `(${item.params.join(", ")}) → ${item.results.length ? item.results.join(", ") : "nothing"}`;
}

function showModule(info) {
  loaded = info;
  $("module").hidden = false;
  $("module-cid").textContent = info.cid;
  $("module-size").textContent = `${info.size.toLocaleString()} bytes`;
  $("module-wasi").textContent = info.wasi ? "yes (a WASI module: inputs go to stdin as JSON)" : "no";
  $("module-exports").replaceChildren(...info.exports.map((item) => el("tr", {},
    el("td", {}, el("code", {}, item.name)), el("td", {}, item.params.join(", ") || "none"),
    el("td", {}, item.results.join(", ") || "none"))));
  $("module-imports").replaceChildren(...(info.imports.length ? info.imports.map(
    (item) => el("li", {}, el("code", {}, `${item.module}.${item.name}`), ` (${item.kind})`))
    : [el("li", { class: "muted" }, "none")]));
  const select = $("entrypoint");
  select.replaceChildren(...info.exports.map(
    (item) => el("option", { value: item.name }, `${item.name} ${signature(item)}`)));
  const start = info.exports.find((item) => item.name === "_start");
  if (start) select.value = "_start";
  $("run-form").hidden = false;
  if (!$("pipeline-nodes").value.trim()) $("pipeline-nodes").value = pipelineTemplate(info);
}

function pipelineTemplate(info) {
  const entrypoint = info.exports[0]?.name ?? "main";
  return json([
    { id: "a", cid: info.cid, entrypoint, inputs: [] },
    { id: "b", cid: info.cid, entrypoint, inputs: [{ $ref: "a" }] },
  ]);
}

// ---------------------------------------------------------------- run and follow

async function run(event) {
  event.preventDefault();
  hideProblem();
  let inputs;
  try {
    inputs = JSON.parse($("inputs").value || "[]");
  } catch (error) {
    showProblem(localProblem("Inputs are not JSON", error.message));
    return;
  }
  if (!Array.isArray(inputs)) {
    showProblem(localProblem("Inputs must be a JSON array", "for example [2, 3]; a WASI module"
                             + " reads the array as JSON on its stdin"));
    return;
  }
  const entrypoint = $("entrypoint").value;
  const limits = { maxGas: numberOf($("max-gas")), maxMemory: numberOf($("max-memory")),
                   maxTime: numberOf($("max-time")) };
  const stepGas = numberOf($("step-gas"));
  const extra = stepGas === undefined ? {} : { step_gas: stepGas };
  const sync = document.querySelector("input[name=mode]:checked").value === "sync";
  const session = $("target").value;
  const button = $("run-button");
  button.disabled = true;
  try {
    await attempt(async () => {
      if (session) {
        const policy = Object.fromEntries(Object.entries({ max_gas: limits.maxGas,
          max_memory: limits.maxMemory, max_time: limits.maxTime })
          .filter(([, value]) => value !== undefined));
        const body = { entrypoint, inputs, ...extra };
        if (Object.keys(policy).length) body.policy = policy;
        if (sync) {
          const result = await relay.sessions.call(session, entrypoint, inputs, { ...limits, ...extra });
          follow(result.request_id, result);
        } else {
          const accepted = await relay.json("POST", `/sessions/${encodeURIComponent(session)}/calls`,
            { safe: true, json: body, headers: { Prefer: "respond-async" } });
          follow(accepted.request_id);
        }
      } else if (sync) {
        const result = await relay.execute(loaded.cid, inputs, { entrypoint, ...limits, ...extra });
        follow(result.request_id, result);
      } else {
        const handle = await relay.submit(loaded.cid, inputs, { entrypoint, ...limits, ...extra });
        follow(handle.requestId);
      }
    });
  } finally {
    button.disabled = false;
  }
}

/** Show one execution: its events from the first (live while it runs) and its result. */
async function follow(requestId, result = null) {
  following?.abort();
  const controller = new AbortController();
  following = controller;
  $("execution").hidden = false;
  $("execution-id").textContent = requestId;
  $("stdout").replaceChildren();
  $("events").replaceChildren();
  $("result").textContent = result ? json(result) : "";
  $("progress").value = 0;
  $("gas").textContent = "";
  setStatus("queued");
  const handle = relay.handle(requestId);
  await attempt(async () => {
    const state = await handle.get();
    // Finished already (a fast run): its result at once, and its events replayed for the log
    // and output without moving its status back through queued and running.
    const finished = FINISHED.has(state.status);
    if (finished) showResult(state);
    else setStatus(state.status);
    for await (const event of handle.events({ signal: controller.signal })) {
      if (controller.signal.aborted) return;
      onExecutionEvent(event, { live: !finished });
    }
    if (!controller.signal.aborted) showResult(await handle.get());
  });
}

function onExecutionEvent({ type, data }, { live = true } = {}) {
  const { type: _type, timestamp, request_id: _id, ...fields } = data;
  logEvent(type, fields, timestamp);
  switch (type) {
    case "execution_queued": if (live) setStatus("queued"); break;
    case "execution_started": case "execution_resumed": if (live) setStatus("running"); break;
    case "execution_paused":
      if (live) setStatus("paused");
      if (data.gas_used !== undefined) showGas(data.gas_used);
      break;
    case "execution_progress": showGas(data.gas_used, data.progress); break;
    case "execution_output":
      $("stdout").append(el("span", { class: data.stream }, data.data));
      $("stdout").scrollTop = $("stdout").scrollHeight;
      break;
    case "execution_complete":
      $("progress").value = 100;
      $("gas").textContent = `${data.gas_used.toLocaleString()} gas · ${data.duration} ms`;
      break;
    default: break;
  }
}

/** Gas used so far, and the share of the budget it is when the event says (progress does). */
function showGas(gasUsed, progress) {
  if (progress !== undefined) $("progress").value = progress;
  $("gas").textContent = progress === undefined ? `${gasUsed.toLocaleString()} gas used`
    : `${progress}% · ${gasUsed.toLocaleString()} gas`;
}

function logEvent(type, fields, timestamp) {
  const log = $("events");
  const time = timestamp ? new Date(timestamp).toLocaleTimeString() : "";
  log.append(el("li", {}, el("code", {}, type), ` ${time} `,
                el("span", { class: "muted" }, JSON.stringify(fields))));
  while (log.children.length > MAX_LOG_LINES) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
}

function showResult(state) {
  setStatus(state.status);
  $("result").textContent = json(state);
  if (state.status === "completed") $("progress").value = 100;
}

function setStatus(status) {
  const badge = $("execution-status");
  badge.textContent = status;
  badge.className = `status s-${status}`;
  $("pause").disabled = status !== "running";
  $("resume").disabled = status !== "paused";
  $("step").disabled = status !== "paused";
  $("step-by").disabled = status !== "paused";
  $("cancel").disabled = FINISHED.has(status);
}

async function control(action) {
  hideProblem();
  const requestId = $("execution-id").textContent;
  await attempt(async () => {
    const answer = await action(relay.handle(requestId));
    if (answer?.status) {
      setStatus(answer.status);
      $("result").textContent = json(answer);   // a step's answer: where it stopped
    }
    if (answer && FINISHED.has(answer.status)) showResult(answer);
  });
}

// ---------------------------------------------------------------- executions

async function refreshExecutions({ more = false } = {}) {
  const cursor = more ? executionsCursor : undefined;
  const page = await fetchFor((client) => client.executions.list({ limit: 25, cursor }));
  if (!page) return;
  executionsCursor = showPage("executions-list", page, {
    more, columns: 5, moreButton: "executions-more", empty: "No executions yet: run one.",
    row: (item) => el("tr", {},
      el("td", {}, linkButton(short(item.request_id),
                              () => { selectTab("run"); follow(item.request_id); },
                              `Open execution ${item.request_id}`)),
      el("td", {}, statusBadge(item.status)),
      el("td", {}, item.error ? `${item.error.code}: ${item.error.message}`
        : item.success ? `ok: ${JSON.stringify(item.output ?? null).slice(0, 80)}` : ""),
      el("td", {}, item.gas_used?.toLocaleString() ?? ""),
      el("td", {}, item.duration ?? "")),
  });
}

// ---------------------------------------------------------------- sessions

async function refreshSessions() {
  const page = await fetchFor((client) => client.sessions.list({ limit: 50 }));
  if (!page) return;
  $("sessions-list").replaceChildren(...page.items.map((item) => el("tr", {},
    el("td", {}, linkButton(short(item.session_id), () => showSession(item.session_id),
                            `Open session ${item.session_id}`)),
    el("td", {}, statusBadge(item.status)), el("td", {}, item.calls),
    el("td", {}, item.gas_used.toLocaleString()),
    el("td", {}, item.state_cid ? el("code", {}, short(item.state_cid)) : "fresh"))));
  if (!page.items.length) {
    $("sessions-list").replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "muted" },
      "No sessions: load a module without _start and create one.")));
  }
  const target = $("target");
  const chosen = target.value;
  target.replaceChildren(el("option", { value: "" }, "a new execution"),
    ...page.items.filter((item) => item.status !== "closed").map(
      (item) => el("option", { value: item.session_id }, `session ${short(item.session_id)}`)));
  target.value = [...target.options].some((option) => option.value === chosen) ? chosen : "";
}

async function showSession(sessionId) {
  const session = await fetchFor((client) => client.sessions.get(sessionId));
  if (!session) return;
  shownSession = session;
  $("session").hidden = false;
  $("session-id").textContent = session.session_id;
  const facts = [["status", statusBadge(session.status)], ["module", el("code", {}, session.cid)],
    ["calls", session.calls], ["gas used", session.gas_used.toLocaleString()],
    ["time used", `${session.time_used} ms`], ["budget", JSON.stringify(session.budget)],
    ["state", session.state_cid ? el("code", {}, session.state_cid) : "fresh"],
    ["state size", `${session.state_size.toLocaleString()} bytes`],
    ["current call", session.current ?? "none"], ["expires", session.expires_at]];
  $("session-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name),
                                                                          el("dd", {}, value)]));
  $("session-close").disabled = session.status === "closed";
  $("session-call").disabled = session.status === "closed";
  const snapshots = await fetchFor((client) => client.snapshots.list({ limit: 100 }));
  if (shownSession !== session) return;
  const mine = (snapshots?.items ?? []).filter((item) => item.session_id === sessionId);
  $("snapshots").replaceChildren(...(mine.length ? mine.map((item) => el("li", {},
    el("code", {}, short(item.snapshot_id)), ` ${item.label ?? ""} · `,
    item.state_cid ? el("code", {}, short(item.state_cid)) : "fresh state", " ",
    el("button", { type: "button", onclick: () => restore(item.snapshot_id),
                   "aria-label": `Restore snapshot ${item.label ?? item.snapshot_id}` }, "Restore")))
    : [el("li", { class: "muted" }, "none")]));
}

async function restore(snapshotId) {
  const sessions = await attempt(() => relay.snapshots.restore(snapshotId));
  if (!sessions) return;
  await refreshSessions();
  await showSession(sessions[0].session_id);
}

async function callFromRun() {
  const session = shownSession;
  if (!loaded || loaded.cid !== session.cid) {
    const info = await attempt(() => relay.modules.get(session.cid));
    if (!info) return;
    showModule(info);
  }
  await refreshSessions();
  $("target").value = session.session_id;
  selectTab("run");
  $("entrypoint").focus();
}

// ---------------------------------------------------------------- pipelines

async function refreshPipelines({ more = false } = {}) {
  const cursor = more ? pipelinesCursor : undefined;
  const page = await fetchFor((client) => client.pipelines.list({ limit: 25, cursor }));
  if (!page) return;
  pipelinesCursor = showPage("pipelines-list", page, {
    more, columns: 4, moreButton: "pipelines-more", empty: "No pipelines yet.",
    row: (item) => el("tr", {},
      el("td", {}, linkButton(short(item.pipeline_id), () => showPipeline(item.pipeline_id),
                              `Open pipeline ${item.pipeline_id}`)),
      el("td", {}, statusBadge(item.status)),
      el("td", {}, `${item.progress.percent}% of ${item.progress.total}`),
      el("td", {}, new Date(item.created_at).toLocaleString())),
  });
}

async function startPipeline(event) {
  event.preventDefault();
  hideProblem();
  let nodes;
  try {
    nodes = JSON.parse($("pipeline-nodes").value);
  } catch (error) {
    showProblem(localProblem("Nodes are not JSON", error.message));
    return;
  }
  const created = await attempt(() => relay.pipelines.create(nodes));
  if (!created) return;
  await showPipeline(created.pipeline_id);
  refreshPipelines();
}

async function showPipeline(pipelineId) {
  followingPipeline?.abort();
  const controller = new AbortController();
  followingPipeline = controller;
  const state = await fetchFor((client) => client.pipelines.get(pipelineId));
  if (!state || controller.signal.aborted) return;
  $("pipeline").hidden = false;
  $("pipeline-id").textContent = pipelineId;
  drawPipeline(state);
  if (FINISHED.has(state.status)) return;
  // Node changes come as pipeline_progress events. A node's execution starting comes as its
  // execution's own events (they carry pipeline_id too): the view maps its request_id to it.
  const view = throttled(async () => {
    const latest = await relay.pipelines.get(pipelineId);
    if (!controller.signal.aborted) mergePipeline(latest);
  });
  await attempt(async () => {
    for await (const event of relay.events({ pipelineId, lastEventId: "0",
                                             signal: controller.signal })) {
      const data = event.data;
      if (event.type === "pipeline_progress" && Object.hasOwn(shownPipeline.nodes, data.node)) {
        shownPipeline.nodes[data.node].status = data.node_status;
        shownPipeline.progress.percent = data.progress;
        paintNode(data.node);
      } else if (event.type === "execution_started" || event.type === "execution_resumed") {
        const node = nodeOfRequest(data.request_id);
        if (node === undefined) view();
        else if (shownPipeline.nodes[node].status === "queued") {
          shownPipeline.nodes[node].status = "running";
          paintNode(node);
        }
      }
      if (event.type === "pipeline_complete" || event.type === "events_lost") break;
    }
    if (!controller.signal.aborted) drawPipeline(await relay.pipelines.get(pipelineId));
  });
}

function nodeOfRequest(requestId) {
  return Object.keys(shownPipeline.nodes).find(
    (id) => shownPipeline.nodes[id].request_id === requestId);
}

/** `action` run now, or once more after the run in flight when called meanwhile. */
function throttled(action) {
  let running = null;
  let again = false;
  const run = () => {
    if (running) { again = true; return; }
    running = action().catch(() => {}).finally(() => {
      running = null;
      if (again) { again = false; run(); }
    });
  };
  return run;
}

const STAGE = { pending: 0, queued: 1, running: 2, retrying: 3, completed: 4, failed: 4,
                skipped: 4, cancelled: 4 };

/** A view read while events arrive: it moves nodes forward, never back to an older stage. */
function mergePipeline(latest) {
  for (const [id, node] of Object.entries(latest.nodes)) {
    if (!Object.hasOwn(shownPipeline.nodes, id)) continue;
    const shown = shownPipeline.nodes[id];
    if (node.attempts > shown.attempts || STAGE[node.status] >= STAGE[shown.status]) {
      shownPipeline.nodes[id] = node;
      paintNode(id);
    }
  }
}

/** Columns by depth (a node sits one column right of its deepest need), rows in order. */
function layout(nodes) {
  // A Map, not an object: node ids such as "constructor" or "__proto__" are valid.
  const depth = new Map();
  const depthOf = (id) => {
    if (!depth.has(id)) {
      depth.set(id, 0);   // a guard: the gateway refuses cycles, so this is never read mid-walk
      depth.set(id, Math.max(-1, ...nodes[id].needs.filter((need) => Object.hasOwn(nodes, need))
        .map(depthOf)) + 1);
    }
    return depth.get(id);
  };
  const columns = [];
  for (const id of Object.keys(nodes)) (columns[depthOf(id)] ??= []).push(id);
  return columns;
}

function drawPipeline(state) {
  shownPipeline = state;
  const status = $("pipeline-status");
  status.textContent = state.status;
  status.className = `status s-${state.status}`;
  $("pipeline-progress").value = state.progress.percent;
  const graph = $("graph");
  const ids = Object.keys(state.nodes);
  graph.replaceChildren();
  if (ids.length > MAX_DRAWN_NODES) {
    graph.setAttribute("width", 0);
    graph.setAttribute("height", 0);
  } else {
    const [w, h, gapX, gapY] = [120, 34, 56, 14];
    const place = new Map();
    const columns = layout(state.nodes);
    columns.forEach((column, x) => column.forEach((id, y) => {
      place.set(id, { x: 8 + x * (w + gapX), y: 8 + y * (h + gapY) });
    }));
    const rows = Math.max(...columns.map((column) => column.length));
    graph.setAttribute("width", 16 + columns.length * (w + gapX) - gapX);
    graph.setAttribute("height", 16 + rows * (h + gapY) - gapY);
    for (const id of ids) {
      for (const need of state.nodes[id].needs ?? []) {
        const from = place.get(need);
        const to = place.get(id);
        if (!from) continue;
        const [x1, y1, x2, y2] = [from.x + w, from.y + h / 2, to.x, to.y + h / 2];
        graph.append(svg("path", { class: "edge",
          d: `M${x1},${y1} C${x1 + gapX / 2},${y1} ${x2 - gapX / 2},${y2} ${x2},${y2}` }));
      }
    }
    for (const id of ids) {
      const group = svg("g", { class: `node ${state.nodes[id].status}`, "data-node": id,
                               transform: `translate(${place.get(id).x},${place.get(id).y})` });
      const title = svg("title");
      const rect = svg("rect", { width: w, height: h });
      const label = svg("text", { x: w / 2, y: h / 2 });
      label.textContent = id.length > 16 ? `${id.slice(0, 15)}…` : id;
      group.append(title, rect, label);
      graph.append(group);
    }
  }
  $("pipeline-nodes-list").replaceChildren(...ids.slice(0, MAX_DRAWN_NODES).map((id) => {
    const node = state.nodes[id];
    const outcome = node.error ? `${node.error.code}: ${node.error.message}`
      : node.output !== undefined ? JSON.stringify(node.output).slice(0, 120) : "";
    return el("tr", { "data-node": id }, el("td", {}, el("code", {}, id)),
              el("td", {}, statusBadge(node.status)), el("td", {}, node.attempts),
              el("td", {}, outcome));
  }));
  ids.forEach(paintNode);
}

function paintNode(id) {
  const node = shownPipeline.nodes[id];
  const group = $("graph").querySelector(`g[data-node="${CSS.escape(id)}"]`);
  if (group) {
    group.setAttribute("class", `node ${node.status}`);
    group.querySelector("title").textContent = `${id}: ${node.status}`;
  }
  const row = $("pipeline-nodes-list").querySelector(`tr[data-node="${CSS.escape(id)}"]`);
  row?.children[1].replaceChildren(statusBadge(node.status));
  $("pipeline-progress").value = shownPipeline.progress.percent;
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("sign-in").addEventListener("submit", async (event) => {
    event.preventDefault();
    await attempt(() => signIn($("api-key").value.trim()));
  });
  $("sign-out").addEventListener("click", signOut);
  $("problem").querySelector(".dismiss").addEventListener("click", hideProblem);
  $("problem").addEventListener("keydown", (event) => { if (event.key === "Escape") hideProblem(); });
  for (const tab of TABS) {
    $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
    $(`tab-${tab}`).addEventListener("keydown", onTabKey);
  }
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (event) => upload(event.target.files[0]));
  $("load").addEventListener("submit", (event) => {
    event.preventDefault();
    hideProblem();
    attempt(() => loadReference($("ref").value));
  });
  $("run-form").addEventListener("submit", run);
  $("pause").addEventListener("click", () => control((handle) => handle.pause()));
  $("resume").addEventListener("click", () => control((handle) => handle.resume()));
  $("step").addEventListener("click", () => control((handle) => handle.step(numberOf($("step-by")))));
  $("cancel").addEventListener("click", () => control((handle) => handle.cancel()));
  $("executions-refresh").addEventListener("click", () => refreshExecutions());
  $("executions-more").addEventListener("click", () => refreshExecutions({ more: true }));
  $("pipelines-more").addEventListener("click", () => refreshPipelines({ more: true }));
  $("sessions-refresh").addEventListener("click", refreshSessions);
  $("pipelines-refresh").addEventListener("click", () => refreshPipelines());
  $("session-create").addEventListener("click", async () => {
    if (!loaded) {
      showProblem(localProblem("No module loaded", "upload or load a module on the Run tab first"));
      return;
    }
    const session = await attempt(() => relay.sessions.create(loaded.cid));
    if (!session) return;
    await refreshSessions();
    await showSession(session.session_id);
  });
  $("session-snapshot").addEventListener("click", async () => {
    const label = $("snapshot-label").value.trim() || undefined;
    if (await attempt(() => relay.sessions.snapshot(shownSession.session_id, label))) {
      await showSession(shownSession.session_id);
    }
  });
  $("session-close").addEventListener("click", async () => {
    await attempt(() => relay.sessions.close(shownSession.session_id));
    await refreshSessions();
    await showSession(shownSession.session_id);
  });
  $("session-call").addEventListener("click", callFromRun);
  $("pipeline-form").addEventListener("submit", startPipeline);
  window.addEventListener("hashchange", () => relay && selectTab(location.hash.slice(1), { focus: false }));
}

wire();
const stored = sessionStorage.getItem(KEY_STORAGE);
if (stored) {
  signIn(stored).catch((error) => {
    sessionStorage.removeItem(KEY_STORAGE);
    signOut();
    showProblem(error);
  });
} else {
  $("sign-in").hidden = false;
  $("api-key").focus();
}
