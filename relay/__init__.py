"""Relay: run untrusted WebAssembly behind an HTTP API.

Kept light on purpose: executors import `relay.bus`, `relay.schemas` and friends without pulling in
the web stack.
"""


def relay_version() -> str:
    """The installed distribution's version, for `relay --version` and `GET /`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relay")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
