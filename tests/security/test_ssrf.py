"""SSRF at connection time: engine.delivery.Sender against real servers on 127.0.0.1 and ::1.

Each refusal is checked two ways: the outcome says `blocked_address` with the address, and a
listener on the target address saw no connection at all. Positive controls (the same target
with its network allowed) prove the listeners would have noticed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from engine.core.signing import request_headers
from engine.delivery import Outcome, Sender
from engine.delivery.resolver import SafeResolver
from engine.settings import Settings
from tests.receiver import Receiver

BODY = b'{"event":"document.uploaded","data":{}}'
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def headers() -> dict[str, str]:
    return request_headers(
        secret="whsec_test_ssrf", body=BODY, event_type="document.uploaded", delivery_id="dlv_s"
    )


class Listener:
    """A TLS server that counts every TCP connection it accepts, then answers 200."""

    def __init__(self, host: str, ssl_context: ssl.SSLContext) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.connections = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> Listener:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._ok)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        # Count connections at the TCP level, before TLS or HTTP could refuse them.
        http = self._runner.server
        assert http is not None

        def counting() -> Any:
            self.connections += 1
            return http()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(counting, sock=sock, ssl=self.ssl_context)
        return self

    async def _ok(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def v4(server_ssl: ssl.SSLContext) -> AsyncIterator[Listener]:
    listener = await Listener("127.0.0.1", server_ssl).start()
    yield listener
    await listener.stop()


@pytest.fixture
async def v6(server_ssl: ssl.SSLContext) -> AsyncIterator[Listener]:
    listener = await Listener("::1", server_ssl).start()
    yield listener
    await listener.stop()


def blocking(ca_file: Path, **changes: Any) -> Settings:
    """Production defaults: nothing allowed. Only our test CA added."""
    return Settings(**{"ca_bundle": ca_file, "delivery_timeout": 5.0, **changes})


async def send(settings: Settings, url: str) -> Outcome:
    async with Sender(settings) as sender:
        return await sender.send(url, BODY, headers())


def assert_blocked(outcome: Outcome, *addresses: str) -> None:
    """Refused as a loopback address, without naming the address (docs/contract.md §7)."""
    assert not outcome.succeeded
    assert outcome.status is None
    assert outcome.error_class == "blocked_address", outcome
    assert outcome.error is not None
    assert "not allowed" in outcome.error
    assert "loopback address" in outcome.error, outcome.error
    for address in addresses:
        assert address not in outcome.error, outcome.error


@pytest.mark.parametrize(
    ("host", "named"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "127.0.0.1"),  # a name: refused by the resolver, not by a literal check
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ],
)
async def test_loopback_v4_is_refused_before_any_connection(
    v4: Listener, ca_file: Path, host: str, named: str
) -> None:
    outcome = await send(blocking(ca_file), f"https://{host}:{v4.port}/hook")
    assert_blocked(outcome, named, "127.0.0.1", "7f00:1")
    assert v4.connections == 0


async def test_loopback_v6_is_refused_before_any_connection(v6: Listener, ca_file: Path) -> None:
    outcome = await send(blocking(ca_file), f"https://[::1]:{v6.port}/hook")
    assert_blocked(outcome, "::1")
    assert v6.connections == 0


@pytest.mark.parametrize("host", ["169.254.169.254", "10.0.0.1", "[fd00:ec2::254]", "0.0.0.0"])
async def test_metadata_and_private_addresses_are_refused(ca_file: Path, host: str) -> None:
    outcome = await send(blocking(ca_file, delivery_timeout=30.0), f"https://{host}/latest")
    assert outcome.error_class == "blocked_address"
    assert outcome.elapsed_ms < 1000  # refused outright, not after a connect timeout


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0x7f.1", "[::1]"])
async def test_positive_control_the_listener_sees_allowed_connections(
    v4: Listener, v6: Listener, ca_file: Path, host: str
) -> None:
    port = v6.port if host == "[::1]" else v4.port
    outcome = await send(
        blocking(ca_file, allowed_networks=LOOPBACK), f"https://{host}:{port}/hook"
    )
    assert outcome.error_class != "blocked_address"
    assert v4.connections + v6.connections == 1
    # The certificate names 127.0.0.1, localhost and ::1; `0x7f.1` is not among them.
    assert outcome.succeeded == (host != "0x7f.1"), outcome


async def test_the_receiver_fixture_sees_nothing_when_blocked(
    receiver: Receiver, ca_file: Path
) -> None:
    outcome = await send(blocking(ca_file), receiver.url + "/hook")
    assert_blocked(outcome, "127.0.0.1")
    # send() has returned, so any request it made has been answered already.
    assert receiver.requests == []


# ---------------------------------------------------------------- DNS rebinding


class LyingResolver(AbstractResolver):
    """A DNS server under an attacker's control: each lookup gets the next answer."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in answer
        ]

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def rebind_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("rebind.example.com").configure_cert(context)
    return context


@pytest.fixture
async def rebind_target(rebind_ssl: ssl.SSLContext) -> AsyncIterator[Listener]:
    listener = await Listener("127.0.0.1", rebind_ssl).start()
    yield listener
    await listener.stop()


async def test_dns_rebinding_public_at_creation_private_at_connection_is_refused(
    rebind_target: Listener, ca_file: Path
) -> None:
    liar = LyingResolver(["93.184.216.34"], ["127.0.0.1"])
    safe = SafeResolver((), inner=liar)
    # At creation the name looks harmless ...
    first = await safe.resolve("rebind.example.com", 443)
    assert [r["host"] for r in first] == ["93.184.216.34"]
    # ... at delivery time it points at loopback, and the connection is refused.
    settings = blocking(ca_file)
    async with Sender(settings, resolver=safe) as sender:
        outcome = await sender.send(
            f"https://rebind.example.com:{rebind_target.port}/hook", BODY, headers()
        )
    assert_blocked(outcome, "127.0.0.1")
    assert "rebind.example.com" in (outcome.error or "")
    assert liar.lookups == ["rebind.example.com", "rebind.example.com"]
    assert rebind_target.connections == 0


@pytest.mark.parametrize(
    "answer",
    [
        ["127.0.0.1", "::ffff:127.0.0.1"],
        ["169.254.169.254"],
        ["fd00:ec2::254"],
        ["not-an-address"],
        ["169.254.169.254", "not-an-address", "10.0.0.1"],
    ],
)
async def test_an_answer_with_no_allowed_address_refuses_the_name(
    rebind_target: Listener, ca_file: Path, answer: list[str]
) -> None:
    safe = SafeResolver((), inner=LyingResolver(answer))
    async with Sender(blocking(ca_file), resolver=safe) as s:
        outcome = await s.send(
            f"https://rebind.example.com:{rebind_target.port}/hook", BODY, headers()
        )
    assert outcome.error_class == "blocked_address", outcome
    assert rebind_target.connections == 0


@pytest.mark.parametrize(
    "answer",
    [["10.0.0.1", "127.0.0.1"], ["127.0.0.1", "169.254.169.254"], ["fd00::1", "127.0.0.1"]],
)
async def test_a_mixed_answer_is_dialled_only_at_its_allowed_addresses(
    rebind_target: Listener, ca_file: Path, answer: list[str]
) -> None:
    # Only loopback is allowed here: the blocked addresses beside it are never handed to the
    # connector, so the delivery reaches the loopback listener and nothing else.
    safe = SafeResolver(LOOPBACK, inner=LyingResolver(answer))
    results = await safe.resolve("rebind.example.com", rebind_target.port, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["127.0.0.1"]
    async with Sender(blocking(ca_file), resolver=safe) as s:
        outcome = await s.send(
            f"https://rebind.example.com:{rebind_target.port}/hook", BODY, headers()
        )
    assert outcome.succeeded, outcome
    assert rebind_target.connections == 1


async def test_positive_control_the_lying_answer_is_what_gets_dialled(
    rebind_target: Listener, ca_file: Path
) -> None:
    safe = SafeResolver(LOOPBACK, inner=LyingResolver(["127.0.0.1"]))
    async with Sender(blocking(ca_file), resolver=safe) as s:
        outcome = await s.send(
            f"https://rebind.example.com:{rebind_target.port}/hook", BODY, headers()
        )
    assert outcome.succeeded, outcome
    assert rebind_target.connections == 1


# ---------------------------------------------------------------- redirects


@pytest.fixture
async def second(server_ssl: ssl.SSLContext) -> AsyncIterator[Receiver]:
    receiver = await Receiver(server_ssl).start()
    yield receiver
    await receiver.stop()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_never_followed(
    receiver: Receiver, second: Receiver, settings: Settings, status: int
) -> None:
    async def redirect(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": second.url + "/stolen"})

    receiver.handler = redirect
    outcome = await send(settings, receiver.url + "/hook")
    assert not outcome.succeeded
    assert outcome.status == status
    assert outcome.error_class == "redirect"
    assert outcome.error is not None
    assert "not followed" in outcome.error
    assert len(receiver.requests) == 1
    assert second.requests == []


async def test_a_redirect_to_the_metadata_address_is_a_plain_failure(
    receiver: Receiver, settings: Settings
) -> None:
    async def redirect(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "http://169.254.169.254/latest"})

    receiver.handler = redirect
    outcome = await send(settings, receiver.url + "/hook")
    assert outcome.error_class == "redirect"


# ---------------------------------------------------------------- hostile headers


@pytest.mark.parametrize(
    ("value", "expected"),
    [("²", None), ("7200", 3600.0), ("soon", None), ("12", 12.0)],
)
async def test_retry_after_from_a_hostile_receiver_never_misclassifies(
    receiver: Receiver, settings: Settings, value: str, expected: float | None
) -> None:
    async def busy(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=503, headers={"Retry-After": value})

    receiver.handler = busy
    outcome = await send(settings, receiver.url + "/hook")
    assert outcome.status == 503
    assert outcome.error_class == "http_status", outcome
    assert outcome.retry_after == expected
