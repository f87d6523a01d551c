#!/usr/bin/env python3
"""The kernel's share of SSE fan-out: CPU per `send()` of a 100-byte event to one of N
loopback TCP sockets whose reader is another process, as the gateway does once per event per
stream. No Python framework involved: this is the floor under `bench_sse.py`'s cost per
delivery on the machine it runs on.

Run:  .venv/bin/python bench/write_floor.py [--sockets 200] [--rounds 200]
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import time


def send_floor_us(sockets: int = 200, rounds: int = 200) -> float:
    """CPU µs of one `send()` of a 100-byte event to one of `sockets` loopback TCP sockets
    read by another process, each round an event to every socket then a 1 ms pause."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(sockets)
    port = server.getsockname()[1]
    message = b"x" * 100
    expected = sockets * rounds * len(message)
    reader = os.fork()
    if reader == 0:  # the clients: read everything, as SSE clients would
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(sockets)]
        selector = selectors.DefaultSelector()
        for client in clients:
            selector.register(client, selectors.EVENT_READ)
        received = 0
        while received < expected:
            for key, _ in selector.select():
                received += len(key.fileobj.recv(65536))  # type: ignore[union-attr]
        os._exit(0)
    streams = [server.accept()[0] for _ in range(sockets)]
    for stream in streams:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn sets it
    began = time.process_time()
    for _ in range(rounds):  # an event to every stream, then a pause, like a fan-out
        for stream in streams:
            stream.send(message)
        time.sleep(0.001)
    cpu = time.process_time() - began
    os.waitpid(reader, 0)
    for stream in streams:
        stream.close()
    server.close()
    return cpu / (sockets * rounds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    per_write = send_floor_us(args.sockets, args.rounds)
    print(f"{args.sockets * args.rounds:,} sends of 100 bytes: {per_write:.2f} µs of CPU each; "
          f"100,000 deliveries/s would take {per_write * 100_000 / 1e6:.0%} of a core "
          f"in send() alone")


if __name__ == "__main__":
    main()
