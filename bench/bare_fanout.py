#!/usr/bin/env python3
"""The least one Python process can do to fan events out: the reference `bench_sse.py`
measures the gateway beside, with the same subscribers, rate and machine, in the same run.

It reads the events stream (XREAD BLOCK, as the gateway's fan-in does) and sends each read's
entries, framed by the gateway's own `relay.gateway.fanin.chunk_of` (one chunk of SSE messages), to
every connected socket with one `send()` each. No framework, no credentials, no filter, no
mailbox, no flow control: what is left of a fan-out once the gateway's own work is gone. Any
GET gets the event stream (a 200 head and a `retry:` line), but `/healthz`, which gets a 200
with `{}` and a close.

Run:  python bench/bare_fanout.py --port P --redis-url URL --stream PREFIX:events
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

import redis

from relay.gateway.fanin import chunk_of, entry

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-store\r\ntransfer-encoding: chunked\r\n\r\n")
RETRY = b"retry: 3000\n\n"


def serve(listener: socket.socket, streams: list[socket.socket]) -> None:
    """Accept connections for ever; event streams join `streams`."""
    while True:
        connection, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            part = connection.recv(4096)
            if not part:
                break
            request += part
        if request.startswith(b"GET /healthz "):
            connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                               b"connection: close\r\n\r\n{}")
            connection.close()
            continue
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn sets it
        connection.sendall(HEAD + b"%x\r\n%b\r\n" % (len(RETRY), RETRY))
        connection.setblocking(False)  # a full socket must not stall the others
        streams.append(connection)  # one append: atomic under the GIL


def fan_out(client: redis.Redis, stream: str, streams: list[socket.socket]) -> None:
    last: bytes | str = "$"
    short = 0
    while True:
        reply = client.xread({stream: last}, count=1000, block=1000)
        for _, entries in reply or ():
            last = entries[-1][0]
            data = chunk_of([entry(entry_id, fields[b"data"]) for entry_id, fields in entries])
            for connection in tuple(streams):
                try:
                    if connection.send(data) != len(data):
                        short += 1
                except BlockingIOError:
                    short += 1
                except OSError:
                    streams.remove(connection)
            if short:
                print(f"{short} sends did not go out whole", file=sys.stderr, flush=True)
                short = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--stream", required=True)
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", args.port), backlog=8192)
    streams: list[socket.socket] = []
    threading.Thread(target=serve, args=(listener, streams), daemon=True).start()
    fan_out(redis.Redis.from_url(args.redis_url), args.stream, streams)


if __name__ == "__main__":
    main()
