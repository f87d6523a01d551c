"""The `celery` peer of `bench_execute.py` (issue 19): FastAPI + Celery + Redis, the usual stack.

- the server: a FastAPI app under uvicorn (the reference's settings) whose sync `def` endpoint
  `POST /execute` validates the reference's JSON body (a pydantic model, FastAPI's way), calls
  the task with `.delay(...)` and waits with `.get(timeout=...)`; FastAPI runs it in its thread
  pool;
- the worker: `celery -A celery_peer worker --pool prefork --concurrency 1` (one prefork pool
  process), which runs the calculator's `main` as the reference does: one Engine, the compiled
  Module cached (per pool process), a fresh Store with fuel per task;
- Redis as both broker and result backend, over the unix socket named by `CELERY_PEER_REDIS`
  (`bench_execute.py` starts a redis-server of its own for it).

Run with the peers' virtualenv (`bench/.venv-peers`, which `bench_execute.py` makes): fastapi,
celery[redis], uvicorn, wasmtime are not the project's dependencies.
  server: python bench/celery_peer.py --port P
  worker: python -m celery -A celery_peer worker ...   (bench/ on PYTHONPATH)
Both need CELERY_PEER_REDIS=/path/to/redis.sock; the worker touches CELERY_PEER_READY (a path)
once it consumes.
"""

import argparse
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready

CALCULATOR_WAT = Path(__file__).resolve().parent.parent / "relay" / "examples" / "calculator.wat"
GAS = 1_000_000_000  # the reference's (RELAY_DEFAULT_MAX_GAS)
RESULT_TIMEOUT_S = 10.0  # wrk's --timeout

_url = "redis+socket://" + os.environ.get("CELERY_PEER_REDIS", "/nonexistent/redis.sock")
app = Celery("celery_peer", broker=_url, backend=_url)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"],
    broker_connection_retry_on_startup=True,
    # Results are read once, at once: no need to keep them a day (the default).
    result_expires=300,
    worker_hijack_root_logger=False,
)

_compiled: tuple[Any, Any] | None = None


def _module() -> tuple[Any, Any]:
    """The Engine and the compiled Module, once per process (each pool process has its own)."""
    global _compiled
    if _compiled is None:
        import wasmtime

        config = wasmtime.Config()
        config.consume_fuel = True
        engine = wasmtime.Engine(config)
        module = wasmtime.Module(engine, bytes(wasmtime.wat2wasm(CALCULATOR_WAT.read_text())))
        _compiled = (engine, module)
    return _compiled


@app.task(name="calculator.run")
def run(entrypoint: str | None, inputs: list[Any]) -> dict[str, Any]:
    import wasmtime

    engine, module = _module()
    started = time.perf_counter()
    store = wasmtime.Store(engine)
    store.set_fuel(GAS)
    instance = wasmtime.Instance(store, module, [])
    func = instance.exports(store)[entrypoint or "main"]
    assert isinstance(func, wasmtime.Func)
    output = func(store, *inputs)
    duration_ms = (time.perf_counter() - started) * 1000
    return {"success": True, "output": output, "gas_used": GAS - store.get_fuel(),
            "duration": round(duration_ms, 3), "error": None}


@worker_process_init.connect
def _compile(**_: Any) -> None:
    _module()  # each pool process compiles once, before its first task


@worker_ready.connect
def _ready(**_: Any) -> None:
    ready = os.environ.get("CELERY_PEER_READY")
    if ready:
        Path(ready).touch()


def serve(host: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel, ConfigDict, Field

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid")
        cid: str
        entrypoint: str | None = None
        inputs: list[Any] = Field(default_factory=list)
        idempotency_key: str | None = None

    api = FastAPI()

    @api.post("/execute")
    def execute(body: Body) -> Any:
        return run.delay(body.entrypoint, body.inputs).get(timeout=RESULT_TIMEOUT_S)

    @api.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(api, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="celery_peer.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    serve(options.host, options.port)
