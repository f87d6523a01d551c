"""relay-client: the Python SDK of Relay, which runs untrusted WebAssembly behind an HTTP API.

    from relay_client import Relay

    with Relay() as relay:  # RELAY_URL, RELAY_API_KEY
        module = relay.modules.push("add.wasm", name="add")
        result = relay.execute("glyph://add", [1, 2], max_gas=1_000_000)
        print(result.output if result.success else result.error)

`AsyncRelay` has the same methods for asyncio. Refusals raise `RelayError`.
"""

from ._async_client import (
    AsyncBatches,
    AsyncBudgets,
    AsyncEnvironments,
    AsyncExecutionHandle,
    AsyncExecutions,
    AsyncModules,
    AsyncNames,
    AsyncPipelines,
    AsyncRelay,
    AsyncSessions,
    AsyncSnapshots,
    AsyncWebhooks,
)
from ._core import verify_webhook
from ._errors import RelayError
from ._models import (
    Batch,
    Budget,
    BudgetUsage,
    Delivery,
    Environment,
    Event,
    Execution,
    ExecutionError,
    Module,
    Page,
    Pipeline,
    Session,
    Snapshot,
)
from ._sync_client import (
    Batches,
    Budgets,
    Environments,
    ExecutionHandle,
    Executions,
    Modules,
    Names,
    Pipelines,
    Relay,
    Sessions,
    Snapshots,
    Webhooks,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncBatches", "AsyncBudgets", "AsyncEnvironments", "AsyncExecutionHandle",
    "AsyncExecutions", "AsyncModules", "AsyncNames", "AsyncPipelines", "AsyncRelay",
    "AsyncSessions", "AsyncSnapshots", "AsyncWebhooks", "Batch", "Batches", "Budget",
    "BudgetUsage", "Budgets", "Delivery", "Environment", "Environments", "Event", "Execution",
    "ExecutionError", "ExecutionHandle", "Executions", "Module", "Modules", "Names", "Page",
    "Pipeline", "Pipelines", "Relay", "RelayError", "Session", "Sessions", "Snapshot",
    "Snapshots", "Webhooks", "verify_webhook",
]
