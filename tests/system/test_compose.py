"""compose.yaml: valid for the Compose Specification, and runs what the README promises.

No Docker daemon here: the file is checked against the specification's own JSON Schema (vendored
in tests/data, see its README) as written and as Compose interpolates it, and what a user relies
on is asserted directly: Redis with an append-only file on a volume, two gateways and two
executors of this project's image, all on the same Redis.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import jsonschema
import pytest
import yaml

from relay.cli import main as relay_main
from relay.settings import VARIABLES, load
from tests.conftest import ROOT

COMPOSE = ROOT / "compose.yaml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
# `${NAME}`, `${NAME:-default}`, `${NAME-default}`: the forms compose.yaml uses.
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """What Compose makes of the file with nothing set in the environment: defaults in."""
    if isinstance(value, str):
        return INTERPOLATION.sub(lambda match: match.group(2) or "", value)
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    return value


@pytest.fixture(scope="module")
def written() -> dict[str, Any]:
    # safe_load resolves the anchors and `<<` merges, as Compose does before validating.
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


@pytest.fixture(scope="module")
def compose(written: dict[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = interpolate(written)
    return document


def services_running(compose: dict[str, Any], command: str) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose["services"].items()
            if service.get("command", [None])[0] == command}


def relay_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**services_running(compose, "gateway"), **services_running(compose, "executor")}


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_the_vendored_schema_is_the_one_its_note_names() -> None:
    note = (ROOT / "tests" / "data" / "README.md").read_text()
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in note, "tests/data/compose-spec.json changed: update tests/data/README.md"
    assert (ROOT / "tests" / "data" / "LICENSE.compose-spec").is_file()


@pytest.mark.parametrize("form", ["as-written", "interpolated"])
def test_compose_yaml_is_valid_for_the_compose_specification(
        form: str, written: dict[str, Any], compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)  # the schema asserts no `format`
    errors = sorted(validator.iter_errors(written if form == "as-written" else compose),
                    key=lambda error: list(error.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in errors)


def test_the_schema_refuses_what_compose_would_refuse(compose: dict[str, Any]) -> None:
    """The validation above can fail: a misspelt key in a service is caught."""
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway-1"]["helthcheck"] = broken["services"]["gateway-1"].pop(
        "healthcheck")
    with pytest.raises(jsonschema.ValidationError, match="helthcheck"):
        jsonschema.validate(broken, schema)


def test_two_gateways_and_two_executors_of_this_project_s_image(
        compose: dict[str, Any]) -> None:
    gateways = services_running(compose, "gateway")
    executors = services_running(compose, "executor")
    assert len(gateways) == 2 and len(executors) == 2, sorted(compose["services"])
    images = {service["image"] for service in relay_services(compose).values()}
    assert len(images) == 1, f"one image for both roles: {images}"
    for name, service in relay_services(compose).items():
        context = service["build"] if isinstance(service["build"], str) else service[
            "build"]["context"]
        assert (ROOT / context / "Dockerfile").is_file(), name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


@pytest.mark.parametrize("role", ["gateway", "executor"])
def test_the_commands_are_ones_the_relay_cli_takes(role: str, compose: dict[str, Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for service in services_running(compose, role).values():
        with pytest.raises(SystemExit) as stopped:
            relay_main([*service["command"], "--help"])
        assert stopped.value.code == 0
    capsys.readouterr()


def test_redis_keeps_an_append_only_file_on_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7"), redis["image"]
    command = redis["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    (volume,) = [mount for mount in redis["volumes"] if mount.endswith(":" + options["--dir"])]
    assert volume.split(":")[0] in compose["volumes"], "a named volume, kept across `down`"
    assert "ping" in redis["healthcheck"]["test"], "the relay services wait for this check"


def test_every_relay_service_uses_the_same_redis_and_prefix(compose: dict[str, Any]) -> None:
    environments = {name: service["environment"]
                    for name, service in relay_services(compose).items()}
    urls = {environment["REDIS_URL"] for environment in environments.values()}
    assert len(urls) == 1, f"one Redis for all: {environments}"
    (url,) = urls
    host = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", url)
    assert host and host.group(1) in compose["services"], url
    assert {environment["RELAY_STREAM_PREFIX"] for environment in environments.values()} == {
        "relay"}


def test_every_setting_given_is_one_relay_reads_and_can_use(compose: dict[str, Any]) -> None:
    for name, service in relay_services(compose).items():
        environment = {key: str(value) for key, value in service["environment"].items()}
        assert set(environment) <= set(VARIABLES), (name, set(environment) - set(VARIABLES))
        # The policy directory is a path inside the container, not on this machine.
        environment.pop("RELAY_POLICY_DIR", None)
        load(environment)


def test_gateways_are_published_on_distinct_ports_and_checked_on_readyz(
        compose: dict[str, Any]) -> None:
    host_ports = []
    for name, gateway in services_running(compose, "gateway").items():
        command = gateway["command"]
        port = command[command.index("--port") + 1]
        (published,) = gateway["ports"]
        *_, host_port, container_port = published.split(":")
        assert container_port == port, name
        host_ports.append(host_port)
        check = " ".join(gateway["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in check, name
        policies = gateway["environment"]["RELAY_POLICY_DIR"]
        (mount,) = [volume for volume in gateway["volumes"] if volume["target"] == policies]
        assert mount["read_only"] is True
        assert (ROOT / mount["source"] / "default.cedar").is_file(), "the default source exists"
    assert len(set(host_ports)) == 2, host_ports


def test_executors_get_longer_to_stop_than_they_drain(compose: dict[str, Any]) -> None:
    for name, executor in services_running(compose, "executor").items():
        drain_ms = load({"RELAY_DRAIN_GRACE": str(executor["environment"]["RELAY_DRAIN_GRACE"])}
                        ).drain_grace_ms
        assert seconds(executor["stop_grace_period"]) * 1000 > drain_ms, name
