"""The `relay` client commands as a user runs them: real processes (gateway, executor, the CLI)
over real HTTP, the CLI reading its URL and key from the environment."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ADD_WAT, ALICE_KEY, ROOT, Processes

TRAP_WAT = '(module (func (export "main") unreachable))'
# A WASI command: "hello" on stdout, some 3·10^9 gas of counting (a second or two: long enough
# for progress events), "oops" on stderr, "bye" on stdout.
TALKER_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "hello\\n")
  (data (i32.const 110) "oops\\n")
  (data (i32.const 120) "bye\\n")
  (func $say (param $fd i32) (param $at i32) (param $n i32)
    (i32.store (i32.const 0) (local.get $at))
    (i32.store (i32.const 4) (local.get $n))
    (drop (call $write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $tick)
  (func (export "_start") (local $i i32)
    (call $say (i32.const 1) (i32.const 100) (i32.const 6))
    (loop $spin
      (call $tick)  ;; the executor sees the fuel used at calls: a call-free loop shows none
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $spin (i32.lt_u (local.get $i) (i32.const 300000000))))
    (call $say (i32.const 2) (i32.const 110) (i32.const 5))
    (call $say (i32.const 1) (i32.const 120) (i32.const 4))))"""


@pytest.fixture
def cli(processes: Processes, tmp_path: Path) -> Cli:
    url = processes.gateway()
    processes.start("executor")
    return Cli(url, tmp_path)


class Cli:
    """`relay …` run in an empty directory (no `.relay` key file) with RELAY_URL and
    RELAY_API_KEY set, as a user's shell would."""

    def __init__(self, url: str, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("RELAY_") and k != "REDIS_URL"}
        self.env.update(RELAY_URL=url, RELAY_API_KEY=ALICE_KEY)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", *args], cwd=self.cwd,
                              env=self.env, capture_output=True, text=True, timeout=60)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "relay", *args], cwd=self.cwd,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def file(self, name: str, text: str) -> str:
        (self.cwd / name).write_text(text)
        return name


def lines_of(process: subprocess.Popen[str]) -> queue.Queue[str]:
    """The process's stdout lines as they come, to take with a timeout."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or ()],
                     daemon=True).start()
    return lines


def test_push_name_and_execute(cli: Cli) -> None:
    pushed = cli("modules", "push", cli.file("add.wat", ADD_WAT), "--name", "adder", "--json")
    assert pushed.returncode == 0, pushed.stderr
    cid = json.loads(pushed.stdout)["cid"]
    plain = cli("modules", "push", "add.wat")
    assert plain.returncode == 0 and plain.stdout.startswith(cid), plain.stdout
    assert "exports: main" in plain.stdout

    run = cli("execute", "glyph://adder", "2", "3")
    assert (run.returncode, run.stdout, run.stderr) == (0, "5\n", "")
    named = cli("names", "set", "adder", "v1", cid)
    assert named.returncode == 0, named.stderr
    result = json.loads(cli("execute", "glyph://adder@v1", "40", "2", "--json",
                            "--gas", "1000000").stdout)
    assert result["success"] is True and result["output"] == 42 and result["cid"] == cid

    listed = json.loads(cli("modules", "ls", "--json").stdout)
    assert cid in [module["cid"] for module in listed["modules"]]


def test_a_trap_exits_1_and_a_refusal_exits_2_with_the_problem(cli: Cli) -> None:
    cid = json.loads(cli("modules", "push", cli.file("trap.wat", TRAP_WAT), "--json").stdout)["cid"]
    trapped = cli("execute", cid)
    assert trapped.returncode == 1
    assert "trap" in trapped.stderr and "Traceback" not in trapped.stderr
    assert json.loads(cli("execute", cid, "--json").stdout)["success"] is False

    refused = cli("execute", "calculator", "5", "3")
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    assert "(400)" in refused.stderr and "glyph://calculator" in refused.stderr
    assert "  /cid: " in refused.stderr, "the problem's pointers are shown"
    problem = json.loads(cli("execute", "calculator", "--json").stdout)
    assert problem["status"] == 400 and problem["errors"][0]["pointer"] == "/cid"

    unknown_key = cli("modules", "ls", "--api-key", "not-a-key")
    assert unknown_key.returncode == 2 and "(401)" in unknown_key.stderr


def test_follow_shows_progress_and_streams_the_output(cli: Cli) -> None:
    cli("modules", "push", cli.file("talker.wat", TALKER_WAT), "--name", "talker")
    followed = cli("execute", "glyph://talker", "--follow", "--gas", "100000000000",
                   "--time", "60000")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "hello\nbye\n", "streamed once, not printed again as the output"
    progress = [line for line in followed.stderr.splitlines() if line.startswith("progress ")]
    assert progress, followed.stderr
    assert "oops" in followed.stderr
    gas = [int(line.split("(gas ")[1].rstrip(")").replace(",", "")) for line in progress]
    assert gas == sorted(gas) and gas[-1] > 100_000_000, "progress reports the gas used"

    out_of_gas = cli("execute", "glyph://talker", "--follow", "--gas", "1000000")
    assert out_of_gas.returncode == 1 and "out_of_gas" in out_of_gas.stderr


def test_events_are_printed_as_they_come(cli: Cli) -> None:
    cli("modules", "push", cli.file("add.wat", ADD_WAT), "--name", "adder")
    watcher = cli.popen("events", "--json")
    lines = lines_of(watcher)
    try:
        request_id = ""
        deadline = time.monotonic() + 30
        seen: list[dict[str, object]] = []
        while not any(e["type"] == "execution_complete" and e["request_id"] == request_id
                      for e in seen):
            if not request_id:  # the stream is open once the command runs; then execute
                time.sleep(0.5)
                request_id = cli("execute", "glyph://adder", "1", "2", "--async").stdout.strip()
                assert len(request_id) == 64, request_id
            try:
                seen.append(json.loads(lines.get(timeout=max(deadline - time.monotonic(), 0))))
            except queue.Empty:
                raise AssertionError(f"no execution_complete printed: {seen}") from None
        assert watcher.poll() is None, "the stream goes on after the execution's end"
        types = [e["type"] for e in seen if e["request_id"] == request_id]
        assert types[0] == "execution_queued" and types[-1] == "execution_complete"
    finally:
        watcher.kill()
        watcher.wait()


def test_a_file_that_cannot_be_read_or_no_gateway_is_a_message_not_a_traceback(
        tmp_path: Path) -> None:
    cli = Cli("http://127.0.0.1:9", tmp_path)  # the discard port: nothing listens
    missing = cli("modules", "push", "nowhere.wasm")
    assert missing.returncode == 2 and "nowhere.wasm" in missing.stderr
    assert "Traceback" not in missing.stderr
    down = cli("modules", "ls")
    assert down.returncode == 2 and "Traceback" not in down.stderr
    assert "Connection failed" in down.stderr


def test_the_key_comes_from_relay_devs_key_file(cli: Cli) -> None:
    del cli.env["RELAY_API_KEY"]
    (cli.cwd / ".relay").mkdir()
    (cli.cwd / ".relay" / "dev-api-key").write_text(ALICE_KEY + "\n")
    assert cli("modules", "ls").returncode == 0
    (cli.cwd / ".relay" / "dev-api-key").write_text("someone-else\n")
    assert cli("modules", "ls").returncode == 2



def test_batch_and_pipelines_run(cli: Cli) -> None:
    cid = json.loads(cli("modules", "push", cli.file("add.wat", ADD_WAT), "--json").stdout)["cid"]
    items = [{"cid": cid, "inputs": [1, 2]}, {"cid": "calculator", "inputs": []}]
    batch = cli("batch", cli.file("batch.json", json.dumps(items)))
    assert batch.returncode == 1, "one item was refused"
    assert batch.stdout.splitlines()[0] == "0: 3"
    assert batch.stdout.splitlines()[1].startswith("1: refused: ")
    good = cli("batch", cli.file("good.json", json.dumps({"items": items[:1]})), "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["results"][0]["output"] == 3

    nodes = [{"id": "a", "cid": cid, "inputs": [1, 2]},
             {"id": "b", "cid": cid, "inputs": [{"$ref": "a"}, 10]}]
    run = cli("pipelines", "run", cli.file("dag.json", json.dumps({"nodes": nodes})), "--follow")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[1] == "completed"
    assert "a: completed" in run.stderr and "b: completed" in run.stderr
    final = json.loads(cli("pipelines", "run", "dag.json", "--json").stdout)
    assert final["status"] == "completed" and final["nodes"]["b"]["output"] == 13


def test_sessions_keep_state_and_snapshots_branch_it(cli: Cli) -> None:
    counter = (ROOT / "relay" / "examples" / "counter.wat").read_text()
    cli("modules", "push", cli.file("counter.wat", counter), "--name", "counter")
    created = cli("sessions", "create", "glyph://counter")
    assert created.returncode == 0, created.stderr
    session = created.stdout.strip()
    assert cli("sessions", "call", session, "add", "5").stdout == "5\n"
    assert cli("sessions", "call", session, "add", "2").stdout == "7\n"
    assert session in cli("sessions", "ls").stdout

    snapshot = cli("sessions", "snapshot", session, "--label", "seven").stdout.strip()
    assert snapshot in cli("snapshots", "ls").stdout
    restored = cli("snapshots", "restore", snapshot, "--branches", "2", "--json")
    branches = [item["session_id"] for item in json.loads(restored.stdout)["items"]]
    assert len(branches) == 2
    assert cli("sessions", "call", branches[0], "add", "1").stdout == "8\n"
    assert cli("sessions", "call", branches[1], "total").stdout == "7\n"

    assert cli("sessions", "rm", session).returncode == 0
    closed = cli("sessions", "call", session, "add", "1")
    assert closed.returncode == 2 and "(409)" in closed.stderr


def test_ctrl_c_while_following_exits_130_and_leaves_the_execution_running(cli: Cli) -> None:
    cli("modules", "push", cli.file("talker.wat", TALKER_WAT), "--name", "talker")
    follower = cli.popen("execute", "glyph://talker", "--follow", "--gas", "100000000000",
                         "--time", "60000")
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "hello\n"  # it runs and is being followed
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 130
    assert "Traceback" not in stderr
    request_id = stderr.split("relay events --request-id ")[1].split("`")[0]
    events = cli.popen("events", "--request-id", request_id, "--json")
    lines = lines_of(events)
    try:
        types: list[str] = []
        while "execution_complete" not in types:  # its events from the first: it went on
            types.append(json.loads(lines.get(timeout=30))["type"])
    finally:
        events.kill()
        events.wait()
