"""Relay: run untrusted WebAssembly behind an HTTP API.

Kept light on purpose: executors import `relay.bus`, `relay.schemas` and friends without pulling in
the web stack.
"""
