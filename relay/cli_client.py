"""The `relay` client commands: the Python SDK (relay_client) from a terminal.

`relay modules push|ls|rm`, `relay names set`, `relay execute`, `relay events`, `relay batch`,
`relay pipelines run`, `relay sessions create|call|ls|rm|snapshot`, `relay snapshots ls|restore`.
The gateway and key come from `--url`/`--api-key`, `RELAY_URL`/
`RELAY_API_KEY`, or the key `relay dev` keeps in its data directory. `--json` prints the
response body. Exit status: 0 done, 1 the execution failed, 2 the request was refused (or the
gateway could not be reached), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the SDK is imported when a client command runs, not by `relay gateway`
    from relay_client import Event, Execution, ExecutionHandle, Relay, RelayError

DONE, FAILED, REFUSED, INTERRUPTED = 0, 1, 2, 130
COMMANDS = ("modules", "names", "execute", "events", "batch", "pipelines", "sessions",
            "snapshots")
DEV_KEY_FILE = "dev-api-key"
"""Under RELAY_DATA_DIR (default ./.relay): where `relay dev` keeps its key."""


def add_commands(commands: Any) -> None:
    """The client commands, on `relay`'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the gateway (RELAY_URL; default http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="an API key (RELAY_API_KEY; default: relay dev's)")
    common.add_argument("--json", action="store_true", help="print the response body as JSON")

    modules = commands.add_parser("modules", help="upload, list, delete modules")
    modules_commands = modules.add_subparsers(dest="modules_command", required=True)
    push = modules_commands.add_parser("push", parents=[common], help="upload a .wasm or .wat")
    push.add_argument("file", type=Path)
    push.add_argument("--name", help="bind glyph://NAME@TAG to it")
    push.add_argument("--tag", help="with --name (default latest)")
    modules_commands.add_parser("ls", parents=[common], help="the modules you may run")
    modules_commands.add_parser("rm", parents=[common], help="delete a module").add_argument(
        "cid")

    names = commands.add_parser("names", help="glyph names")
    names_set = names.add_subparsers(dest="names_command", required=True).add_parser(
        "set", parents=[common], help="bind (or move) glyph://NAME@TAG to a module")
    for argument in ("name", "tag", "cid"):
        names_set.add_argument(argument)

    execute = commands.add_parser("execute", parents=[common], help="run a module",
                                  description="INPUTs are JSON when they parse, else strings.")
    execute.add_argument("ref", help="a CID or glyph://NAME@TAG")
    execute.add_argument("inputs", nargs="*", metavar="INPUT", type=_input)
    execute.add_argument("--entrypoint")
    execute.add_argument("--gas", type=int, help="max_gas (fuel)")
    execute.add_argument("--memory", type=int, help="max_memory (bytes)")
    execute.add_argument("--time", type=int, help="max_time (ms)")
    mode = execute.add_mutually_exclusive_group()
    mode.add_argument("--async", dest="run_async", action="store_true",
                      help="print the request id at once")
    mode.add_argument("--follow", action="store_true",
                      help="show progress and stream stdout/stderr as it runs")

    events = commands.add_parser("events", parents=[common], help="your events as they come")
    events.add_argument("--request-id", action="append",
                        help="only this execution's, from its first event (repeatable)")

    batch = commands.add_parser("batch", parents=[common],
                                help="run a JSON file of execute requests")
    batch.add_argument("file", type=Path, help='[{"cid": …}, …] or {"items": […], …}')

    pipelines = commands.add_parser("pipelines", help="DAGs of executions")
    run = pipelines.add_subparsers(dest="pipelines_command", required=True).add_parser(
        "run", parents=[common], help="run a JSON pipeline ({\"nodes\": […]}) to its end")
    run.add_argument("file", type=Path)
    run.add_argument("--follow", action="store_true", help="show each node's progress")

    sessions = commands.add_parser("sessions", help="stateful instances of a module")
    sessions_commands = sessions.add_subparsers(dest="sessions_command", required=True)
    create = sessions_commands.add_parser("create", parents=[common], help="open a session")
    create.add_argument("ref", help="a CID or glyph://NAME@TAG")
    create.add_argument("--environment")
    call = sessions_commands.add_parser("call", parents=[common],
                                        help="call a function; its state is kept for the next")
    call.add_argument("session_id")
    call.add_argument("entrypoint")
    call.add_argument("inputs", nargs="*", metavar="INPUT", type=_input)
    call.add_argument("--gas", type=int, help="max_gas (fuel)")
    call.add_argument("--memory", type=int, help="max_memory (bytes)")
    call.add_argument("--time", type=int, help="max_time (ms)")
    sessions_commands.add_parser("ls", parents=[common], help="your sessions")
    sessions_commands.add_parser("rm", parents=[common], help="close a session").add_argument(
        "session_id")
    snapshot = sessions_commands.add_parser("snapshot", parents=[common],
                                            help="keep a session's state as a snapshot")
    snapshot.add_argument("session_id")
    snapshot.add_argument("--label")

    snapshots = commands.add_parser("snapshots", help="saved session states")
    snapshots_commands = snapshots.add_subparsers(dest="snapshots_command", required=True)
    snapshots_commands.add_parser("ls", parents=[common], help="your snapshots")
    restore = snapshots_commands.add_parser("restore", parents=[common],
                                            help="new sessions starting from a snapshot")
    restore.add_argument("snapshot_id")
    restore.add_argument("--branches", type=int, default=1, help="how many (1-64)")


def main(args: argparse.Namespace) -> int:
    try:
        from relay_client import Relay, RelayError
    except ImportError:
        print("relay: the client commands need the relay-client package "
              "(pip install ./clients/python)", file=sys.stderr)
        return REFUSED
    try:
        with Relay(args.url, api_key(args.api_key)) as relay:
            return HANDLERS[args.command](relay, args)
    except RelayError as problem:
        report(problem, args.json)
        return REFUSED
    except KeyboardInterrupt:
        return INTERRUPTED
    except OSError as exc:  # a FILE that cannot be read
        print(f"relay: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return REFUSED


def api_key(given: str | None) -> str | None:
    """--api-key, else RELAY_API_KEY, else the key `relay dev` keeps (None: the SDK's own)."""
    if given or os.environ.get("RELAY_API_KEY"):
        return given or os.environ["RELAY_API_KEY"]
    path = Path(os.environ.get("RELAY_DATA_DIR", ".relay")) / DEV_KEY_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def report(problem: RelayError, as_json: bool) -> None:
    """A refusal as the user can act on it: title, detail, pointers; no traceback."""
    if as_json and problem.body:
        emit(problem.body)
    status = f" ({problem.status})" if problem.status else ""
    print(f"relay: {problem.title}{status}: {problem.detail}", file=sys.stderr)
    for error in problem.errors:
        print(f"  {error.get('pointer', '')}: {error.get('detail', '')}", file=sys.stderr)
    if problem.status == 0:
        print("  (is the gateway running? `relay dev` starts one; --url or RELAY_URL names "
              "another)", file=sys.stderr)


def emit(body: Any) -> None:
    print(json.dumps(body, indent=2), flush=True)


def _input(text: str) -> Any:
    """An INPUT: JSON when it parses (`5`, `[1,2]`, `"x"`), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


# --- modules and names ---


def modules(relay: Relay, args: argparse.Namespace) -> int:
    if args.modules_command == "push":
        module = relay.modules.push(args.file, name=args.name, tag=args.tag)
        if args.json:
            emit(module.raw)
        else:
            exports = ", ".join(str(e.get("name")) for e in module.exports)
            bound = f" as glyph://{args.name}@{args.tag or 'latest'}" if args.name else ""
            print(f"{module.cid}{bound} ({module.size} bytes; exports: {exports or 'none'})")
    elif args.modules_command == "ls":
        items = [module.raw for module in _all(relay.modules.list)]
        if args.json:
            emit({"modules": items})
        for item in [] if args.json else items:
            exports = ", ".join(str(e.get("name")) for e in item.get("exports", []))
            print(f"{item['cid']}  {item.get('size', '?'):>8}  {exports}")
    else:
        relay.modules.delete(args.cid)
        if not args.json:
            print(f"deleted {args.cid}")
    return DONE


def _all(list_page: Callable[..., Any]) -> Iterator[Any]:
    cursor = None
    while True:
        page = list_page(cursor=cursor)
        yield from page.items
        cursor = page.next_cursor
        if not cursor:
            return


def names(relay: Relay, args: argparse.Namespace) -> int:
    answer = relay.names.set(args.name, args.tag, args.cid)
    if args.json:
        emit(answer)
    else:
        print(f"glyph://{args.name}@{args.tag} -> {args.cid}")
    return DONE


# --- execute ---


def execute(relay: Relay, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"entrypoint": args.entrypoint, "max_gas": args.gas,
                               "max_memory": args.memory, "max_time": args.time}
    if args.run_async:
        handle = relay.submit(args.ref, args.inputs, **options)
        if args.json:
            emit({"request_id": handle.request_id})
        else:
            print(handle.request_id)
        return DONE
    if args.follow:
        return follow(relay.submit(args.ref, args.inputs, **options), args)
    return show_result(relay.execute(args.ref, args.inputs, **options), args.json, True)


def show_result(result: Execution, as_json: bool, print_output: bool) -> int:
    """The result on stdout (the output, or the whole body with --json), a failure's code and
    message on stderr; the exit status of its outcome."""
    if as_json:
        emit(result.raw)
    elif result.success and print_output:
        output = result.output
        print(output if isinstance(output, str) else json.dumps(output), flush=True)
    if not result.success:
        error = result.error
        reason = f"{error.code}: {error.message}" if error else result.status
        print(f"relay: execution {result.request_id} failed: {reason}", file=sys.stderr)
        return FAILED
    return DONE


def follow(handle: ExecutionHandle, args: argparse.Namespace) -> int:
    """Progress from gas use on stderr (a bar at a terminal, a line per update elsewhere), the
    module's stdout and stderr as they come, then the result."""
    streamed = False
    with Progress() as progress:
        try:
            for event in handle.events():
                if event.type == "execution_progress":
                    progress.update(event)
                elif event.type == "execution_output":
                    streamed = True
                    stream = sys.stderr if event.data.get("stream") == "stderr" else sys.stdout
                    progress.write(stream, str(event.data.get("data", "")))
        except KeyboardInterrupt:
            progress.stop()
            return interrupted(handle)
    return show_result(handle.get(), args.json, not streamed)


def interrupted(handle: ExecutionHandle) -> int:
    """Ctrl-C while following: ask whether to pause or cancel the execution, or leave it."""
    from relay_client import RelayError

    choice = ""
    if sys.stdin.isatty():
        try:
            choice = input(f"\n{handle.request_id}: [p]ause, [c]ancel, or Enter to leave it "
                           "running? ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            choice = ""
    try:
        if choice.startswith("p"):
            handle.pause()
            print(f"paused {handle.request_id}", file=sys.stderr)
        elif choice.startswith("c"):
            handle.cancel()
            print(f"cancelled {handle.request_id}", file=sys.stderr)
        else:
            print(f"{handle.request_id} goes on; `relay events --request-id "
                  f"{handle.request_id}` follows it", file=sys.stderr)
    except RelayError as problem:
        report(problem, False)
    return INTERRUPTED


class Progress:
    """Gas used as a share of the budget: rich's bar on a terminal, plain lines otherwise (a
    log or a pipe has no use for redrawn bars)."""

    def __init__(self) -> None:
        self.bar: Any = None
        if sys.stderr.isatty():
            import rich.progress

            self.bar = rich.progress.Progress(
                rich.progress.TextColumn("gas"), rich.progress.BarColumn(),
                rich.progress.TaskProgressColumn(), rich.progress.TextColumn("{task.fields[gas]}"),
                console=rich.console.Console(stderr=True), transient=True)
            self.task = self.bar.add_task("gas", total=100, gas="")

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, event: Event) -> None:
        percent, gas = event.data.get("progress", 0), event.data.get("gas_used", 0)
        if self.bar is not None:
            self.bar.update(self.task, completed=percent, gas=f"{gas:,}")
        else:
            print(f"progress {percent}% (gas {gas:,})", file=sys.stderr, flush=True)

    def write(self, stream: Any, text: str) -> None:
        if self.bar is not None and stream is sys.stderr:
            self.bar.console.print(text, end="", markup=False, highlight=False)
        else:
            stream.write(text)
            stream.flush()


# --- events, batches, pipelines ---


def events(relay: Relay, args: argparse.Namespace) -> int:
    """Events from now on; an execution's (--request-id) from its first, still retained."""
    start = "0" if args.request_id else None
    for event in relay.events(request_id=args.request_id, last_event_id=start):
        if args.json:
            print(json.dumps({"id": event.id, **event.data}), flush=True)
        else:
            data = {k: v for k, v in event.data.items()
                    if k not in ("type", "request_id", "timestamp")}
            print(f"{event.data.get('timestamp', '')} {event.type} "
                  f"{event.data.get('request_id', '')} {json.dumps(data)}", flush=True)
    return DONE


def batch(relay: Relay, args: argparse.Namespace) -> int:
    body = json.loads(args.file.read_text())
    items, options = (body, {}) if isinstance(body, list) else (body.pop("items"), body)
    result = relay.batches.run(items, callback_url=options.get("callback_url"))
    if args.json:
        emit(result.raw)
    failed = False
    for index, item in enumerate(result.results):
        ok = item.get("success") is True
        failed |= not ok
        if args.json:
            continue
        if "success" not in item:  # the item was refused: this is its problem
            print(f"{index}: refused: {item.get('title')}: {item.get('detail')}")
        elif ok:
            print(f"{index}: {json.dumps(item.get('output'))}")
        else:
            error = item.get("error") or {}
            print(f"{index}: failed: {error.get('code')}: {error.get('message')}")
    return FAILED if failed else DONE


def pipelines(relay: Relay, args: argparse.Namespace) -> int:
    body = json.loads(args.file.read_text())
    pipeline = relay.pipelines.create(body.pop("nodes"), **body)

    def progress(event: Event) -> None:
        data = event.data
        print(f"{data.get('node')}: {data.get('node_status')} "
              f"(pipeline {data.get('progress', 0):.0f}% done)", file=sys.stderr, flush=True)

    if not args.json:
        print(f"pipeline {pipeline.pipeline_id}", file=sys.stderr, flush=True)
    final = relay.pipelines.wait(pipeline.pipeline_id,
                                 on_progress=progress if args.follow else None)
    if args.json:
        emit(final.raw)
    else:
        print(f"{final.pipeline_id} {final.status}")
    return DONE if final.status == "completed" else FAILED


# --- sessions and snapshots ---


def sessions(relay: Relay, args: argparse.Namespace) -> int:
    command = args.sessions_command
    if command == "create":
        session = relay.sessions.create(args.ref, environment=args.environment)
        _show(session.raw, session.session_id, args.json)
    elif command == "call":
        result = relay.sessions.call(args.session_id, args.entrypoint, args.inputs,
                                     max_gas=args.gas, max_memory=args.memory,
                                     max_time=args.time)
        return show_result(result, args.json, True)
    elif command == "ls":
        items = [session.raw for session in _all(relay.sessions.list)]
        lines = [f"{item['session_id']}  {item.get('status')}  calls {item.get('calls')}  "
                 f"{item.get('cid')}" for item in items]
        _show({"items": items}, "\n".join(lines), args.json)
    elif command == "rm":
        relay.sessions.close(args.session_id)
        _show({}, f"closed {args.session_id}", args.json)
    else:
        snapshot = relay.sessions.snapshot(args.session_id, args.label)
        _show(snapshot.raw, snapshot.snapshot_id, args.json)
    return DONE


def snapshots(relay: Relay, args: argparse.Namespace) -> int:
    if args.snapshots_command == "ls":
        items = [snapshot.raw for snapshot in _all(relay.snapshots.list)]
        lines = [f"{item['snapshot_id']}  {item.get('session_id')}  {item.get('label') or ''}"
                 for item in items]
        _show({"items": items}, "\n".join(lines), args.json)
    else:
        branches = relay.snapshots.restore(args.snapshot_id, branch_count=args.branches)
        _show({"items": [session.raw for session in branches]},
              "\n".join(session.session_id for session in branches), args.json)
    return DONE


def _show(body: Any, text: str, as_json: bool) -> None:
    if as_json:
        emit(body)
    elif text:
        print(text)


HANDLERS: dict[str, Callable[[Relay, argparse.Namespace], int]] = {
    "modules": modules, "names": names, "execute": execute, "events": events,
    "batch": batch, "pipelines": pipelines, "sessions": sessions, "snapshots": snapshots}
