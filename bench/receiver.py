"""A fast HTTPS webhook receiver, run in its own process so it is not what the benchmark measures.

A raw asyncio Protocol parses just enough HTTP/1.1 (keep-alive, Content-Length bodies) to answer.
It listens on several ports, one endpoint each, in three kinds: `ok` answers 200, `fail`
answers 500, `hang` reads the request and never answers (the sender's timeout ends it). It
counts arrivals per kind, checks every signature, and records publish-to-receive latency from
the `t=<unix time>;` prefix the benchmark puts in `data.document.fileName`.

Control is one JSON object a line on stdin (`{"cmd": "count" | "stats" | "reset" | "quit"}`),
each answered by one JSON line on stdout; the first line on stdout lists the ports.

    python -m bench.receiver --cert C --key K --secret S --ok 20 --fail 2 --hang 12
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import hmac
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["KINDS", "percentile", "run", "serve"]

KINDS = ("ok", "fail", "hang")
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
_FAIL = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nContent-Type: text/plain\r\n\r\n"
    b"fail"
)
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_TIME_MARK = b'"fileName":"t='
_DELIVERY_MARK = b'"deliveryId":"'
_MAX_HEAD = 16 * 1024
_MAX_BODY = 1024 * 1024


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats drifting
    return sorted_values[int(min(rank, len(sorted_values))) - 1]


@dataclass
class Tally:
    """What arrived since the last reset, by endpoint kind."""

    arrivals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    ok_ids: set[bytes] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)  # beside each latency
    bad_signatures: int = 0
    connections: int = 0
    first_ok: float | None = None
    last_ok: float | None = None


class Receiver:
    """The shared state of every endpoint in this process."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.tally = Tally()

    def arrived(self, kind: str, head: bytes, body: bytes) -> None:
        now = time.time()
        tally = self.tally
        tally.arrivals[kind] += 1
        if not _signature_ok(self.secret, head, body):
            tally.bad_signatures += 1
        if kind != "ok":
            return
        if tally.first_ok is None:
            tally.first_ok = now
        tally.last_ok = now
        start = body.find(_DELIVERY_MARK)
        if start >= 0:
            start += len(_DELIVERY_MARK)
            tally.ok_ids.add(body[start : body.find(b'"', start)])
        start = body.find(_TIME_MARK)
        if start >= 0:
            start += len(_TIME_MARK)
            try:
                sent = float(body[start : body.find(b";", start)])
            except ValueError:
                return
            tally.latencies.append(now - sent)
            tally.arrived_at.append(now)

    def count(self) -> dict[str, Any]:
        t = self.tally
        return {
            "arrivals": t.arrivals,
            "okUnique": len(t.ok_ids),
            "badSignatures": t.bad_signatures,
            "connections": t.connections,
            "firstOk": t.first_ok,
            "lastOk": t.last_ok,
        }

    def stats(self) -> dict[str, Any]:
        values = sorted(self.tally.latencies)
        result = self.count()
        result["latency"] = {
            "n": len(values),
            "p50": percentile(values, 50),
            "p99": percentile(values, 99),
            "p999": percentile(values, 99.9),
            "max": values[-1] if values else None,
        }
        result["tail"] = _tail_by_second(self.tally, result["latency"]["p99"])
        return result


def _tail_by_second(tally: Tally, p99: float | None) -> list[list[float]]:
    """Where in time the slowest 1% fell: [second from the first arrival, arrivals, of them
    at or over p99, worst ms] for each second that holds any of them — a few seconds holding
    most of the tail is a stall; a tail spread over every second is queueing."""
    if p99 is None or not tally.arrived_at:
        return []
    start = tally.arrived_at[0]
    seconds: dict[int, list[float]] = {}
    for at, latency in zip(tally.arrived_at, tally.latencies, strict=True):
        row = seconds.setdefault(int(at - start), [0, 0, 0.0])
        row[0] += 1
        if latency >= p99:
            row[1] += 1
            row[2] = max(row[2], latency * 1000)
    rows = sorted(seconds.items())
    return [[s, n, slow, round(worst, 1)] for s, (n, slow, worst) in rows if slow]


def _header(head_lower: bytes, name: bytes) -> bytes | None:
    start = head_lower.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = head_lower.find(b"\r\n", start)
    return head_lower[start : end if end >= 0 else None].strip()


def _signature_ok(secret: bytes, head: bytes, body: bytes) -> bool:
    # Header names are case-insensitive; the hex digest is lowercase, so lowering is safe.
    given = _header(head.lower(), b"x-cargolint-signature")
    if given is None:
        return False
    expected = b"sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, given)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parse requests as they complete and answer in order."""

    __slots__ = ("_buffer", "_kind", "_receiver", "_transport")

    def __init__(self, receiver: Receiver, kind: str) -> None:
        self._receiver = receiver
        self._kind = kind
        self._buffer = b""
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, so no isinstance here.
        self._transport = transport
        self._receiver.tally.connections += 1

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        transport = self._transport
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    transport.write(_BAD)
                    transport.close()
                    buffer = b""
                break
            head = buffer[:end]
            lower = head.lower()
            raw_length = _header(lower, b"content-length")
            try:
                length = int(raw_length) if raw_length is not None else 0
            except ValueError:
                length = -1
            if length < 0 or length > _MAX_BODY or _header(lower, b"transfer-encoding"):
                transport.write(_BAD)
                transport.close()
                buffer = b""
                break
            total = end + 4 + length
            if len(buffer) < total:
                break
            body = buffer[end + 4 : total]
            buffer = buffer[total:]
            self._receiver.arrived(self._kind, head, body)
            if self._kind == "ok":
                transport.write(_OK)
            elif self._kind == "fail":
                transport.write(_FAIL)
            # "hang": say nothing; the client gives up at its timeout and closes.
            if _header(lower, b"connection") == b"close":
                transport.close()
                buffer = b""
                break
        self._buffer = buffer


async def serve(
    receiver: Receiver, context: ssl.SSLContext, kinds: dict[str, int]
) -> tuple[dict[str, list[int]], list[asyncio.Server]]:
    """Listen on 127.0.0.1, one port per endpoint; return the ports by kind and the servers."""
    loop = asyncio.get_running_loop()
    ports: dict[str, list[int]] = {kind: [] for kind in KINDS}
    servers: list[asyncio.Server] = []
    for kind in KINDS:
        for _ in range(kinds.get(kind, 0)):
            server = await loop.create_server(
                lambda kind=kind: _Connection(receiver, kind),  # type: ignore[misc]
                "127.0.0.1",
                0,
                ssl=context,
                backlog=1024,
            )
            servers.append(server)
            ports[kind].append(server.sockets[0].getsockname()[1])
    return ports, servers


async def _control(receiver: Receiver) -> None:
    """Answer commands from stdin until `quit` or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = orjson.loads(line).get("cmd")
        if command == "quit":
            break
        if command == "reset":
            receiver.tally = Tally()
            gc.collect()  # here, between measurements, not in the middle of one (see _main)
            answer: dict[str, Any] = {"ok": True}
        elif command == "stats":
            answer = receiver.stats()
        else:
            answer = receiver.count()
        sys.stdout.write(orjson.dumps(answer).decode() + "\n")
        sys.stdout.flush()


async def _main(args: argparse.Namespace) -> None:
    # No collector pause in the middle of a measurement: garbage is collected on `reset`.
    gc.disable()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    receiver = Receiver(args.secret.encode())
    ports, servers = await serve(
        receiver, context, {"ok": args.ok, "fail": args.fail, "hang": args.hang}
    )
    sys.stdout.write(orjson.dumps({"ports": ports}).decode() + "\n")
    sys.stdout.flush()
    try:
        await _control(receiver)
    finally:
        for server in servers:
            server.close()


def run(coro: Any) -> Any:
    """Run a coroutine on uvloop where it is installed, like the engine's commands do."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--ok", type=int, default=1)
    parser.add_argument("--fail", type=int, default=0)
    parser.add_argument("--hang", type=int, default=0)
    args = parser.parse_args(argv)
    run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
