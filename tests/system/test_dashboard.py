"""The Grafana dashboard in k8s/: it parses, and every metric and label it queries is one the
gateway's /metrics exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from executor.worker import Executor
from tests.conftest import upload, wait_for
from tests.relay.gateway.test_pipelines import TRAP_WAT

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(relay_[a-z0-9_]+)")
GROUPED = re.compile(r"by \(([a-z_, ]+)\) \(\s*(?:rate|increase)?\(?\s*(relay_[a-z0-9_]+)")
SELECTED = re.compile(r"(relay_[a-z0-9_]+)\{([a-z_]+)")
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert all(exprs)
    return exprs


def exposed(text: str) -> dict[str, set[str]]:
    """Every metric name /metrics exposes (histograms under their parts' names too), with the
    labels its samples carry."""
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            for part in HISTOGRAM_PARTS if kind == "histogram" else ("",):
                labels.setdefault(name + part, set())
        elif line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            name = name.split()[0]
            labels.setdefault(name, set()).update(
                re.findall(r'([a-z_]+)="', rest.partition("}")[0]))
    return labels


async def test_every_query_names_a_metric_and_labels_that_exist(
        http: httpx.AsyncClient, executor: Executor) -> None:
    trap = (await upload(http, TRAP_WAT))["cid"]
    await http.post("/intent/execute-wasm", json={"cid": trap, "inputs": [1]})

    async def with_error_code() -> dict[str, set[str]] | None:
        metrics = exposed((await http.get("/metrics")).text)
        return metrics if "code" in metrics.get("relay_execute_wasm_error_total", ()) else None
    metrics: dict[str, Any] = await wait_for(with_error_code)
    for expr in queries():
        for name in METRIC.findall(expr):
            assert name in metrics, f"{name} (in {expr!r}) is not in /metrics"
        for grouped_by, name in GROUPED.findall(expr):
            for label in (part.strip() for part in grouped_by.split(",")):
                if label != "le":
                    assert label in metrics[name], f"{name} has no label {label}"
        for name, label in SELECTED.findall(expr):
            assert label in metrics[name], f"{name} has no label {label}"


def test_the_dashboard_reads_every_replica_as_the_cluster() -> None:
    # Each gateway replica reports the whole deployment's totals: a sum would multiply them.
    for expr in queries():
        assert "sum(" not in expr and "sum by" not in expr, expr
