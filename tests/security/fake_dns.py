"""A DNS server for tests on 127.0.0.1: answers A queries from a table, swallows some names.

Deliberately simple (UDP only, one question per query, dnspython doing the wire format): just
enough to point a resolver at through its own configuration, never the machine's.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


@dataclass
class FakeDns(asyncio.DatagramProtocol):
    """`records` maps a name to its A addresses and TTL; names in `hang` are never answered.

    Any other name is NXDOMAIN; an AAAA query for a known name gets no answer (NODATA).
    `queries` counts what arrived, by (name, type).
    """

    records: dict[str, tuple[list[str], int]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    queries: Counter[tuple[str, str]] = field(default_factory=Counter)
    port: int = 0
    _transport: asyncio.DatagramTransport | None = None

    @property
    def server(self) -> str:
        """The address as c-ares and CARGOLINT_DNS_SERVERS take it."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeDns:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.port = transport.get_extra_info("sockname")[1]
        return self

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def asked(self, name: str, kind: str = "A") -> int:
        return self.queries[(name, kind)]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | bytes, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        kind = dns.rdatatype.to_text(question.rdtype)
        self.queries[(name, kind)] += 1
        if name in self.hang:
            return
        response = dns.message.make_response(query)
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            addresses, ttl = self.records[name]
            response.answer.append(
                dns.rrset.from_text_list(question.name, ttl, "IN", "A", addresses)
            )
        assert self._transport is not None
        self._transport.sendto(response.to_wire(), addr)
