"""Authorization: whether the policies (Cedar, `relay.policy`) let a principal act.

Every route asks here: `execute`, `upload` and `admin` on a module, `subscribe` (and listing
names) on the gateway, and who may bind a glyph name (its first binder). A refusal is 403
`forbidden` and counts in `permission_denied`.
"""

from __future__ import annotations

from relay.errors import Forbidden
from relay.metrics import Metrics
from relay.modules import ModuleStore
from relay.policy import ModuleResource, Policies


class Authorizer:
    def __init__(self, policies: Policies, modules: ModuleStore, metrics: Metrics) -> None:
        self.policies = policies
        self.modules = modules
        self.metrics = metrics

    def permits(self, principal: str, action: str, resource: ModuleResource | None) -> bool:
        """The policies' answer, counting nothing (for listings that hide what is refused)."""
        return self.policies.authorize(principal, action, resource)

    def require(self, principal: str, action: str, resource: ModuleResource | None) -> None:
        """Raises Forbidden unless the policies permit it."""
        if not self.permits(principal, action, resource):
            raise self.refusal(principal, action,
                               f"module {resource.cid}" if resource else "here")

    def refusal(self, principal: str, action: str, what: str) -> Forbidden:
        """The 403 for a refused action (counted), to raise."""
        self.metrics.count("permission_denied")
        return Forbidden(f"the policies do not allow {principal} to {action} {what}")

    async def module(self, cid: str, name: str = "") -> ModuleResource:
        """The Cedar view of a stored module. Raises NotFound."""
        stored = await self.modules.require(cid)
        return ModuleResource(cid, name, stored.owner)

    def require_name(self, principal: str, name: str, owner: str | None) -> None:
        """Raises Forbidden when `name` is bound by another principal: nobody may redirect
        another's name."""
        if owner is not None and owner != principal:
            raise self.name_taken(name)

    def name_taken(self, name: str) -> Forbidden:
        # Not counted in `permission_denied`: that counts the policies' refusals.
        return Forbidden(f"the name {name} belongs to another principal")
