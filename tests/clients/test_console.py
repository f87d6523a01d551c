"""The web console (GET /console) driven in headless Chromium as a person would use it, against a
real gateway over a socket, a real executor and Redis, under the page's own CSP.

Chromium is Debian's (`/usr/bin/chromium`), driven by Playwright for Python through
`executable_path`. Screenshots land in build/test-artifacts/console/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from executor.worker import Executor
from tests.clients.browser import browser_page, expect, needs_chromium
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    BOB_KEY,
    FIXTURES,
    ROOT,
    Served,
    cid_of,
    wait_for,
)

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = needs_chromium

ARTIFACTS = ROOT / "build" / "test-artifacts" / "console"
# Counts down from n and answers n. The call in its loop matters: wasmtime writes the fuel a
# function used back to the store at calls, so a loop without one shows no gas used until it
# ends, and cannot be stepped by gas.
SPIN_WAT = """(module (func $tick)
  (func (export "spin") (param $n i64) (result i64) (local $i i64)
  (local.set $i (local.get $n))
  (block $done (loop $again
    (br_if $done (i64.eqz (local.get $i)))
    (call $tick)
    (local.set $i (i64.sub (local.get $i) (i64.const 1)))
    (br $again)))
  (local.get $n)))"""
COUNTER_WAT = (ROOT / "relay" / "examples" / "counter.wat").read_text()
PLENTY = "100000000000"


@contextlib.asynccontextmanager
async def console_page(served: Served, *, width: int = 1100) -> AsyncIterator[Page]:
    """A fresh Chromium page on the console (new profile: empty sessionStorage), failing the
    test on any script error or CSP violation the page reports."""
    async with browser_page(f"{served.url}/console", width=width) as page:
        yield page


async def sign_in(page: Page, key: str = ALICE_KEY) -> None:
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()


async def start_pipeline(page: Page, nodes: Any) -> None:
    """Start a pipeline of `nodes` from the Pipelines tab, as a person pastes it there."""
    await page.get_by_role("tab", name="Pipelines").click()
    await page.get_by_label("Nodes (JSON array").fill(json.dumps(nodes))
    await page.get_by_role("button", name="Start").click()


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def push(served: Served, source: str, name: str) -> str:
    async with httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY}) as http:
        answer = await http.post("/modules", content=source, params={"name": name},
                                 headers={"Content-Type": "text/plain"})
        assert answer.status_code in (200, 201), answer.text
        cid: str = answer.json()["cid"]
        return cid


async def test_upload_run_watch_pause_resume_and_see_the_result(served: Served,
                                                                executor: Executor) -> None:
    ticker = (FIXTURES / "ticker.wasm").read_bytes()
    async with console_page(served) as page:
        await sign_in(page)
        await expect(page.get_by_role("tab", name="Run")).to_have_attribute(
            "aria-selected", "true")
        await page.set_input_files("#file", str(FIXTURES / "ticker.wasm"))
        await expect(page.locator("#module-cid")).to_have_text(cid_of(ticker))
        await expect(page.locator("#module-exports")).to_contain_text("_start")
        await expect(page.locator("#module-imports")).to_contain_text(
            "wasi_snapshot_preview1.fd_write")
        await page.get_by_label("Inputs (JSON array)").fill("[40]")
        await page.get_by_label("Max gas").fill(PLENTY)
        await page.get_by_label("Max time (ms)").fill("60000")
        await page.get_by_role("button", name="Run", exact=True).click()

        await expect(page.locator("#stdout")).to_contain_text("step 2")
        await page.get_by_role("button", name="Pause").click()
        await expect(page.locator("#execution-status")).to_have_text("paused")
        await expect(page.get_by_role("button", name="Resume")).to_be_enabled()
        await expect(page.get_by_role("button", name="Pause")).to_be_disabled()
        await screenshot(page, "paused")
        await page.get_by_role("button", name="Resume").click()
        await expect(page.locator("#execution-status")).to_have_text("completed")

        await expect(page.locator("#stdout")).to_contain_text("step 40\ndone")
        await expect(page.locator("#result")).to_contain_text('"status": "completed"')
        result = json.loads(await page.locator("#result").text_content() or "{}")
        assert result["status"] == "completed" and result["success"] is True
        assert result["output"].endswith("step 40\ndone\n")
        assert await page.eval_on_selector("#progress", "bar => bar.value") == 100
        await expect(page.locator("#gas")).to_contain_text(f"{result['gas_used']:,} gas")
        log = await page.locator("#events").text_content() or ""
        for kind in ("execution_queued", "execution_started", "execution_progress",
                     "execution_output", "execution_paused", "execution_resumed",
                     "execution_complete"):
            assert kind in log, kind
        await screenshot(page, "completed")

        await page.get_by_role("tab", name="Executions").click()
        row = page.locator("#executions-list tr", has=page.get_by_role(
            "button", name=f"Open execution {result['request_id']}"))
        await expect(row).to_contain_text("completed")
        await screenshot(page, "executions")


async def test_a_refused_request_shows_its_problem(served: Served, executor: Executor) -> None:
    async with console_page(served) as page:
        await sign_in(page, "not-a-key")
        problem = page.get_by_role("alert")
        await expect(problem).to_contain_text("(401)")
        assert (await problem.locator(".title").text_content() or "").strip()
        assert (await problem.locator(".detail").text_content() or "").strip()
        await expect(page.get_by_label("API key")).to_be_visible()

        await sign_in(page)
        await expect(problem).to_be_hidden()
        # Dropped on the drop zone, as a person drags a file from their desktop.
        transfer = await page.evaluate_handle(
            """text => { const transfer = new DataTransfer();
                         transfer.items.add(new File([text], "add.wat", {type: "text/plain"}));
                         return transfer; }""", ADD_WAT)
        await page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        await expect(page.locator("#module-exports")).to_contain_text("main")
        await expect(page.get_by_label("Export")).to_have_value("main")

        await page.get_by_label("Inputs (JSON array)").fill("[1, 2")
        await page.get_by_role("button", name="Run", exact=True).click()
        await expect(problem).to_contain_text("Inputs are not JSON")
        await page.get_by_role("button", name="Dismiss").click()
        await expect(problem).to_be_hidden()

        await page.get_by_label("Inputs (JSON array)").fill("[1, 2]")
        await page.get_by_label("Max gas").fill(str(10**16))
        await page.get_by_role("button", name="Run", exact=True).click()
        await expect(problem).to_contain_text("(400)")
        await expect(problem.locator(".errors")).to_contain_text("/policy/max_gas")
        assert (await problem.locator(".detail").text_content() or "").strip()
        await screenshot(page, "problem")

        await page.get_by_label("Max gas").fill("")
        await page.get_by_role("button", name="Run", exact=True).click()
        await expect(page.locator("#execution-status")).to_have_text("completed")
        await expect(page.locator("#result")).to_contain_text('"output": 3')
        await expect(problem).to_be_hidden()


async def test_by_keyboard_alone_at_360_pixels_step_and_cancel(served: Served,
                                                               executor: Executor) -> None:
    await push(served, SPIN_WAT, "spin")
    async with console_page(served, width=360) as page:
        await expect(page.get_by_label("API key")).to_be_focused()
        await page.keyboard.type(ALICE_KEY)
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("tab", name="Run")).to_be_focused()

        for name in ("Executions", "Sessions", "Pipelines", "Run"):
            await page.keyboard.press("ArrowRight")
            await expect(page.get_by_role("tab", name=name)).to_be_focused()
            await expect(page.get_by_role("tab", name=name)).to_have_attribute(
                "aria-selected", "true")
            width = await page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= 360, f"the {name} tab is {width} px wide"

        await page.get_by_label("or by reference").focus()
        await page.keyboard.type("glyph://spin@latest")
        await page.keyboard.press("Enter")
        await expect(page.locator("#module-exports")).to_contain_text("spin")
        await page.get_by_label("Inputs (JSON array)").focus()
        await page.keyboard.press("Control+A")
        await page.keyboard.type("[100000000000]")
        await page.get_by_label("Max gas").focus()
        await page.keyboard.type(PLENTY)
        await page.get_by_label("Step gas").focus()
        await page.keyboard.type("5000000")
        await page.get_by_role("button", name="Run", exact=True).focus()
        await page.keyboard.press("Enter")

        status = page.locator("#execution-status")
        await expect(status).to_have_text("paused")
        pauses = page.locator("#events li", has_text="execution_paused")
        await expect(pauses).to_have_count(1)
        await page.get_by_role("button", name="Step").focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("#result")).to_contain_text('"status": "paused"')
        await expect(pauses).to_have_count(2)
        await expect(status).to_have_text("paused")
        stepped = json.loads(await page.locator("#result").text_content() or "{}")
        assert stepped["gas_used"] >= 2 * 5_000_000, stepped
        width = await page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 360, f"the run tab is {width} px wide with an execution shown"
        await screenshot(page, "narrow-stepped")

        await page.get_by_role("button", name="Cancel").focus()
        await page.keyboard.press("Enter")
        await expect(status).to_have_text("cancelled")
        await expect(page.locator("#result")).to_contain_text('"code": "cancelled"')


async def test_sessions_calls_snapshots_and_branches(served: Served, executor: Executor) -> None:
    await push(served, COUNTER_WAT, "tally")
    async with console_page(served) as page:
        await sign_in(page)
        await page.get_by_label("or by reference").fill("glyph://tally@latest")
        await page.get_by_role("button", name="Load").click()
        await expect(page.locator("#module-exports")).to_contain_text("total")

        await page.get_by_role("tab", name="Sessions").click()
        await page.get_by_role("button", name="New session of the loaded module").click()
        facts = page.locator("#session-facts")
        await expect(facts).to_contain_text("idle")
        session_id = await page.locator("#session-id").text_content()
        assert session_id and session_id.startswith("ses_")

        await page.get_by_role("button", name="Call it from Run").click()
        await expect(page.get_by_label("Run in")).to_have_value(session_id)
        await page.get_by_label("Export").select_option("add")
        await page.get_by_label("sync, wait for the result").check()
        for value, total in ((5, 5), (7, 12)):
            await page.get_by_label("Inputs (JSON array)").fill(f"[{value}]")
            await page.get_by_role("button", name="Run", exact=True).click()
            await expect(page.locator("#result")).to_contain_text(f'"output": {total}')
            await expect(page.locator("#execution-status")).to_have_text("completed")

        await page.get_by_role("tab", name="Sessions").click()
        await page.get_by_role("button", name=f"Open session {session_id}").click()
        await expect(facts).to_contain_text("calls2")
        await page.get_by_label("Snapshot label").fill("twelve")
        await page.get_by_role("button", name="Snapshot").click()
        snapshot = page.locator("#snapshots li", has_text="twelve")
        await expect(snapshot).to_be_visible()
        await screenshot(page, "session")

        await snapshot.get_by_role("button", name="Restore").click()
        await expect(page.locator("#session-id")).not_to_have_text(session_id)
        branch = await page.locator("#session-id").text_content()
        await expect(facts).to_contain_text("idle")
        async with httpx.AsyncClient(base_url=served.url,
                                     headers={"X-API-Key": ALICE_KEY}) as http:
            original = (await http.get(f"/sessions/{session_id}")).json()
            restored = (await http.get(f"/sessions/{branch}")).json()
        assert restored["state_cid"] == original["state_cid"] is not None

        await page.get_by_role("button", name=f"Open session {session_id}").click()
        await page.get_by_role("button", name="Close").click()
        await expect(facts).to_contain_text("closed")
        await expect(page.get_by_role("button", name="Close")).to_be_disabled()


async def test_a_pipeline_is_drawn_and_its_nodes_change_colour_as_they_run(
        served: Served, executor: Executor) -> None:
    spin = await push(served, SPIN_WAT, "spin")
    policy = {"max_gas": int(PLENTY)}
    nodes = [{"id": "first", "cid": spin, "entrypoint": "spin", "inputs": [400_000_000],
              "policy": policy},
             {"id": "left", "cid": spin, "entrypoint": "spin", "inputs": [{"$ref": "first"}],
              "policy": policy},
             {"id": "right", "cid": spin, "entrypoint": "spin", "inputs": [{"$ref": "first"}],
              "policy": policy}]
    async with console_page(served) as page:
        await sign_in(page)
        await start_pipeline(page, nodes)

        graph = page.locator("#graph")
        await expect(graph.locator("g.node")).to_have_count(3)
        await expect(graph.locator("path.edge")).to_have_count(2)
        # Live: the first node is seen running, then its dependents, then all completed.
        await expect(graph.locator('g.node.running[data-node="first"]')).to_have_count(1)
        await expect(graph.locator('g.node.completed[data-node="first"]')).to_have_count(1)
        await expect(graph.locator("g.node.completed")).to_have_count(3)
        await expect(page.locator("#pipeline-status")).to_have_text("completed")
        await expect(page.locator("#pipeline-nodes-list")).to_contain_text("400000000")
        assert await page.eval_on_selector("#pipeline-progress", "bar => bar.value") == 100
        # Columns by depth: both dependents sit right of the node they take from.
        first = await graph.locator('g[data-node="first"]').bounding_box()
        for name in ("left", "right"):
            box = await graph.locator(f'g[data-node="{name}"]').bounding_box()
            assert first and box and box["x"] > first["x"] + first["width"], name
        await screenshot(page, "pipeline")

        await page.get_by_role("button", name="Refresh").click()
        await expect(page.locator("#pipelines-list")).to_contain_text("100% of 3")


# Markup where a hostile module or tenant controls the text: in what it writes, in its export
# names (WAT lets an export be named anything), in inputs echoed back as a pipeline's output,
# in a snapshot label and in the detail of a refused request. The console sets them all as text.
MARKUP = "<img src=x onerror=alert(1)>"
STDOUT = "<script>alert(2)</script><img src=x onerror=alert(3)>"
STDERR = "<b>bold</b><svg onload=alert(4)>"
LONG_NAME = "x" * 300


def hostile_wat() -> str:
    def put(fd: int, at: int, text: str) -> str:
        return (f"(call $put (i32.const {fd}) (i32.const {at}) (i32.const {len(text) + 1}))")
    return f"""(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 256) "{STDOUT}\\n")
  (data (i32.const 1024) "{STDERR}\\n")
  (func $put (param $fd i32) (param $at i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $at))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start") {put(1, 256, STDOUT)} {put(2, 1024, STDERR)})
  (func (export "{MARKUP}"))
  (func (export "{LONG_NAME}")))"""


async def assert_no_injected_markup(page: Page) -> None:
    elements = await page.evaluate(
        "() => [...document.querySelectorAll('img, b, script, svg')].map(node => node.id"
        " || node.tagName + (node.getAttribute('src') ?? ''))")
    assert elements == ["SCRIPTconsole/console.js", "graph"], elements
    assert await page.title() == "Relay console"


async def assert_fits(page: Page, what: str, width: int = 360) -> None:
    scroll = await page.evaluate("() => document.documentElement.scrollWidth")
    assert scroll <= width, f"{what}: the page is {scroll} px wide"


async def test_hostile_text_is_shown_as_text_at_360_pixels(served: Served,
                                                          executor: Executor) -> None:
    hostile = await push(served, hostile_wat(), "hostile")
    echo = await push(served, (ROOT / "relay" / "examples" / "echo.wat").read_text(), "echo")
    await push(served, COUNTER_WAT, "tally")
    async with console_page(served, width=360) as page:
        await sign_in(page)
        await page.get_by_label("or by reference").fill("glyph://hostile@latest")
        await page.get_by_role("button", name="Load").click()
        await expect(page.locator("#module-cid")).to_have_text(hostile)
        await expect(page.locator("#module-exports")).to_contain_text(MARKUP)
        await expect(page.get_by_label("Export")).to_have_value("_start")
        await page.get_by_role("button", name="Run", exact=True).click()
        await expect(page.locator("#execution-status")).to_have_text("completed")
        await expect(page.locator("#stdout")).to_contain_text(STDOUT)
        await expect(page.locator("#stdout")).to_contain_text(STDERR)
        await expect(page.locator("#result")).to_contain_text('"status": "completed"')
        await assert_fits(page, "the Run tab with a hostile module run")
        await page.get_by_role("tab", name="Executions").click()
        await expect(page.locator("#executions-list")).to_contain_text("completed")
        await assert_fits(page, "the Executions tab")

        # A refused request whose detail may echo what was asked for.
        await page.get_by_role("tab", name="Run").click()
        await page.get_by_label("or by reference").fill(MARKUP)
        await page.get_by_role("button", name="Load").click()
        problem = page.get_by_role("alert")
        await expect(problem).to_contain_text("(4")
        await page.get_by_role("button", name="Dismiss").click()

        await page.get_by_label("or by reference").fill("glyph://tally@latest")
        await page.get_by_role("button", name="Load").click()
        await expect(page.locator("#module-exports")).to_contain_text("total")
        await page.get_by_role("tab", name="Sessions").click()
        await page.get_by_role("button", name="New session of the loaded module").click()
        await expect(page.locator("#session-facts")).to_contain_text("idle")
        await page.get_by_label("Snapshot label").fill(MARKUP)
        await page.get_by_role("button", name="Snapshot").click()
        await expect(page.locator("#snapshots")).to_contain_text(MARKUP)
        await assert_fits(page, "the Sessions tab with a session shown")

        await page.get_by_role("tab", name="Pipelines").click()
        nodes = [{"id": "shout", "cid": echo, "inputs": [MARKUP, STDOUT]},
                 {"id": "again", "cid": echo, "inputs": [{"$ref": "shout"}]}]
        await page.get_by_label("Nodes (JSON array").fill(json.dumps(nodes))
        await page.get_by_role("button", name="Start").click()
        await expect(page.locator("#pipeline-status")).to_have_text("completed")
        await expect(page.locator("#pipeline-nodes-list")).to_contain_text(MARKUP)
        await assert_fits(page, "the Pipelines tab with a pipeline shown")
        await screenshot(page, "hostile-narrow")
        await assert_no_injected_markup(page)


async def test_node_ids_that_name_object_properties_are_drawn(served: Served,
                                                              executor: Executor) -> None:
    # Node ids match [A-Za-z0-9_.-]{1,64}: "constructor" and "__proto__" are valid ones, and
    # name what every plain JavaScript object already has.
    add = await push(served, ADD_WAT, "add")
    nodes = [{"id": "constructor", "cid": add, "entrypoint": "main", "inputs": [1, 2]},
             {"id": "__proto__", "cid": add, "entrypoint": "main",
              "inputs": [{"$ref": "constructor"}, 4]},
             {"id": "toString", "cid": add, "entrypoint": "main",
              "inputs": [{"$ref": "__proto__"}, {"$ref": "constructor"}]}]
    async with console_page(served) as page:
        await sign_in(page)
        await start_pipeline(page, nodes)
        graph = page.locator("#graph")
        await expect(page.locator("#pipeline-status")).to_have_text("completed")
        await expect(graph.locator("g.node.completed")).to_have_count(3)
        await expect(graph.locator("path.edge")).to_have_count(3)
        boxes = {name: await graph.locator(f'g[data-node="{name}"]').bounding_box()
                 for name in ("constructor", "__proto__", "toString")}
        assert all(boxes.values()), boxes
        xs = [box["x"] for box in boxes.values() if box]
        assert xs[0] < xs[1] < xs[2], boxes
        last = page.locator('#pipeline-nodes-list tr[data-node="toString"]')
        await expect(last).to_contain_text("10")

        # A glyph tag named like one is no tag either.
        await page.get_by_role("tab", name="Run").click()
        await page.get_by_label("or by reference").fill("glyph://add@constructor")
        await page.get_by_role("button", name="Load").click()
        await expect(page.get_by_role("alert")).to_contain_text("No such tag")


async def test_the_key_stays_in_this_tab_and_signing_out_forgets_what_was_shown(
        served: Served, executor: Executor) -> None:
    echo = await push(served, (ROOT / "relay" / "examples" / "echo.wat").read_text(), "echo")
    await push(served, COUNTER_WAT, "tally")
    # A key in the address is not a way in (it would sit in history and in logs).
    async with browser_page(f"{served.url}/console?api_key={ALICE_KEY}&key={ALICE_KEY}"
                            f"#{ALICE_KEY}") as page:
        await expect(page.get_by_label("API key")).to_be_visible()
        await expect(page.locator("#app")).to_be_hidden()
        assert await page.evaluate("() => sessionStorage.length") == 0

    requests: list[tuple[str, dict[str, str]]] = []
    messages: list[str] = []
    async with console_page(served) as page:
        page.on("request", lambda request: requests.append((request.url, request.headers)))
        page.on("console", lambda message: messages.append(message.text))
        await sign_in(page)
        await page.get_by_label("or by reference").fill("glyph://echo@latest")
        await page.get_by_role("button", name="Load").click()
        await expect(page.locator("#module-cid")).to_have_text(echo)
        await page.get_by_label("Inputs (JSON array)").fill('["alice-private"]')
        await page.get_by_role("button", name="Run", exact=True).click()
        await expect(page.locator("#result")).to_contain_text('"status": "completed"')
        await expect(page.locator("#stdout")).to_contain_text("alice-private")
        request_id = await page.locator("#execution-id").text_content()
        await page.get_by_label("or by reference").fill("glyph://tally@latest")
        await page.get_by_role("button", name="Load").click()
        await expect(page.locator("#module-exports")).to_contain_text("total")
        await page.get_by_role("tab", name="Sessions").click()
        await page.get_by_role("button", name="New session of the loaded module").click()
        await expect(page.locator("#session-facts")).to_contain_text("idle")
        session_id = await page.locator("#session-id").text_content()
        await start_pipeline(page,
            [{"id": "alice-node", "cid": echo, "inputs": ["alice-private"]}])
        await expect(page.locator("#pipeline-status")).to_have_text("completed")
        pipeline_id = await page.locator("#pipeline-id").text_content()
        assert request_id and session_id and pipeline_id

        # Where the key is, and where it is not.
        assert await page.evaluate("() => sessionStorage.getItem('relay.apiKey')") == ALICE_KEY
        assert await page.evaluate("() => sessionStorage.length") == 1
        assert await page.evaluate("() => localStorage.length") == 0
        assert await page.context.cookies() == []
        assert ALICE_KEY not in page.url
        await expect(page.get_by_label("API key")).to_have_value("")
        assert ALICE_KEY not in await page.content()
        assert requests
        for url, headers in requests:
            assert url.startswith(f"{served.url}/") and ALICE_KEY not in url, url
            assert not headers.get("referer"), (url, headers["referer"])
            assert headers.get("x-api-key") in (None, ALICE_KEY), url
        assert not [text for text in messages if ALICE_KEY in text]

        # Bob signs in on the same tab: nothing of Alice's shows, nor sits hidden in the page.
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_label("API key")).to_be_focused()
        assert await page.evaluate("() => sessionStorage.length") == 0
        await sign_in(page, BOB_KEY)
        await expect(page.get_by_role("tab", name="Run")).to_have_attribute(
            "aria-selected", "true")
        for card in ("#module", "#run-form", "#execution", "#session", "#pipeline"):
            await expect(page.locator(card)).to_be_hidden()
        for tab, empty in (("Executions", "No executions yet"), ("Sessions", "No sessions"),
                           ("Pipelines", "No pipelines yet")):
            await page.get_by_role("tab", name=tab).click()
            await expect(page.locator(f"#{tab.lower()}-list")).to_contain_text(empty)
        await expect(page.get_by_label("Run in")).to_have_value("")
        html = await page.content()
        for secret in ("alice-private", request_id, session_id, pipeline_id, ALICE_KEY):
            assert secret not in html, secret
        assert await page.evaluate("() => sessionStorage.getItem('relay.apiKey')") == BOB_KEY


NAMED_ROLES = {"button", "textbox", "combobox", "spinbutton", "radio", "checkbox", "tab",
               "tabpanel", "progressbar", "listbox", "searchbox", "slider", "link", "img"}


async def unnamed_controls(page: Page) -> list[str]:
    """Controls shown whose accessible name (as Chromium computes it for a screen reader) is
    empty."""
    cdp = await page.context.new_cdp_session(page)
    tree = await cdp.send("Accessibility.getFullAXTree")
    await cdp.detach()
    return [f"{node['role']['value']} {node.get('backendDOMNodeId')}"
            for node in tree["nodes"] if not node.get("ignored")
            and node.get("role", {}).get("value") in NAMED_ROLES
            and not str(node.get("name", {}).get("value", "")).strip()]


async def tab_through(page: Page) -> list[str]:
    """Tab from the first control around to it again; each stop that shows no focus ring."""
    await page.get_by_role("button", name="Sign out").focus()
    unringed: list[str] = []
    for _ in range(80):
        await page.keyboard.press("Tab")
        stop = await page.evaluate("""() => { const node = document.activeElement;
            const style = getComputedStyle(node);
            const ringed = node.matches(':focus-visible') && style.outlineStyle !== 'none'
                && parseFloat(style.outlineWidth) >= 2;
            return [node.id || node.tagName + ' ' + node.textContent.slice(0, 30), ringed]; }""")
        if stop[0] == "sign-out":
            return unringed
        if not stop[1] and not stop[0].startswith("BODY"):   # past the last: the browser's
            unringed.append(stop[0])
    raise AssertionError("Tab never came back to Sign out")


async def test_controls_are_named_focus_shows_and_problems_give_focus_back(
        served: Served, executor: Executor) -> None:
    add = await push(served, ADD_WAT, "add")
    await push(served, COUNTER_WAT, "tally")
    async with console_page(served, width=360) as page:
        assert await unnamed_controls(page) == []
        await sign_in(page)
        reference = page.get_by_label("or by reference")
        await reference.fill("glyph://tally@latest")
        await page.get_by_role("button", name="Load").click()
        await expect(page.locator("#module-exports")).to_contain_text("total")
        await page.get_by_label("Export").select_option("total")
        await page.get_by_role("button", name="Run", exact=True).click()
        await expect(page.locator("#result")).to_contain_text('"status": "completed"')
        # The status is a live region: a screen reader hears it change.
        await expect(page.get_by_role("status")).to_contain_text("completed")
        await page.get_by_role("tab", name="Sessions").click()
        await page.get_by_role("button", name="New session of the loaded module").click()
        await page.get_by_label("Snapshot label").fill("first")
        await page.get_by_role("button", name="Snapshot").click()
        await expect(page.get_by_role("button", name="Restore snapshot first")).to_be_visible()
        await start_pipeline(page,
            [{"id": "one", "cid": add, "entrypoint": "main", "inputs": [1, 2]}])
        await expect(page.locator("#pipeline-status")).to_have_text("completed")

        for tab in ("Run", "Executions", "Sessions", "Pipelines"):
            await page.get_by_role("tab", name=tab).click()
            panel = page.get_by_role("tabpanel", name=tab)
            await expect(panel).to_be_visible()
            await expect(page.get_by_role("tabpanel")).to_have_count(1)
            await assert_fits(page, f"the {tab} tab with its content")
            assert await unnamed_controls(page) == [], tab
            assert await tab_through(page) == [], tab

        # A problem takes the focus, Escape or Dismiss puts it back where it was.
        await page.get_by_role("tab", name="Run").click()
        problem = page.get_by_role("alert")
        for close in ("Escape", "Enter"):
            await reference.fill("glyph://nothing-here")
            await reference.press("Enter")
            await expect(problem).to_be_visible()
            await expect(problem.get_by_role("button", name="Dismiss")).to_be_focused()
            await page.keyboard.press(close)
            await expect(problem).to_be_hidden()
            await expect(reference).to_be_focused()


async def test_long_lists_show_more_and_a_late_answer_is_not_shown_to_the_next_user(
        served: Served, executor: Executor) -> None:
    async with httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY},
                                 timeout=30) as http:
        add = await push(served, ADD_WAT, "adder")
        for n in range(27):
            answer = await http.post("/intent/execute-wasm",
                                     json={"cid": add, "inputs": [n, 1]})
            assert answer.status_code == 200, answer.text
    async with console_page(served) as page:
        await sign_in(page)
        await page.get_by_role("tab", name="Executions").click()
        rows = page.locator("#executions-list tr")
        await expect(rows).to_have_count(25)
        await page.get_by_role("button", name="Show more").click()
        await expect(rows).to_have_count(27)
        await expect(page.get_by_role("button", name="Show more")).to_be_hidden()
        listed = await rows.locator("button").evaluate_all(
            "buttons => buttons.map(b => b.getAttribute('aria-label'))")
        assert len(set(listed)) == 27, "a page repeated or skipped an execution"

        # Alice asks for her list again and signs out before it comes; Bob signs in meanwhile.
        held, release = [], asyncio.Event()

        async def hold(route: Any) -> None:  # Alice's request waits; later ones go through
            if not held:
                held.append(route)
                await release.wait()
            await route.continue_()

        await page.route("**/executions?*", hold)
        await page.get_by_role("button", name="Refresh").click()
        await wait_for(lambda: bool(held), timeout_s=30)
        await page.get_by_role("button", name="Sign out").click()
        await sign_in(page, BOB_KEY)
        await page.get_by_role("tab", name="Executions").click()
        await expect(page.locator("#executions-list")).to_contain_text("No executions yet")
        async with page.expect_response("**/executions?*") as late:
            release.set()
        await (await late.value).finished()
        for _ in range(3):  # let the page's own tasks run after the answer came in
            await page.evaluate("() => new Promise(done => setTimeout(done, 0))")
        await expect(page.locator("#executions-list")).to_contain_text("No executions yet")
        await expect(rows).to_have_count(1)
