"""A buffered AMQP frame reader for aiormq: whole socket reads, parsed in a loop.

aiormq's own `FrameReceiver` reads each frame with three awaited `readexactly` calls under a
lock into a `BytesIO`, then decodes it with pamqp; a message is three frames (method, header,
body), so that is nine awaits and three copies per message — with the decoding of the
`Basic.Deliver` method, ≈ 8 % of the worker's CPU at full load. This reader takes what the
socket has (up to `READ_SIZE`), cuts every complete frame out of it and keeps the rest for the
next read. It yields the same `(bytes, channel, frame)` triples as aiormq's, with the same
pamqp frame objects, so everything above it (channels, consumers, heartbeats, closes) is
aiormq's unchanged. The three frames of a delivered message — `Basic.Deliver`, a content
header with simple properties (no headers table, timestamp or cluster id), body — nearly all a
busy consumer reads, are decoded here directly; every other frame by pamqp.

A message whose three frames come in one read (nearly all, at 1 KiB) is handed on as one
`Delivery` — the `Basic.Deliver` carrying its header and body — so aiormq passes one item, not
three, through the channel's queue, and `install()`'s `Channel._on_deliver_frame` takes it
whole. That method also calls a consumer registered with `consume_inline` directly, in delivery
order, instead of starting a task per message as aiormq does (a task, its wrapper, the future
store and two done callbacks per message). The queue hops and the task were ≈ 8 % of the
worker's CPU at full load.

`install()` makes aiormq use both for connections opened afterwards (aiormq builds its receiver
by the module-level name inside `Connection.connect`); `tests/worker/test_amqp_frames.py`
checks that this still takes effect on the aiormq version installed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import aiormq.channel
import aiormq.connection
import pamqp.frame
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

__all__ = ["BufferedFrameReceiver", "Delivery", "consume_inline", "install"]

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024

_HEADER = struct.Struct(">BHI")  # frame type, channel, payload size
_HEADER_SIZE = 7
_FRAME_END = 0xCE
_FRAME_METHOD = 1
_FRAME_BODY = 3
_FRAME_HEADER = 2
_METHOD_INDEX = struct.Struct(">I")
_DELIVER_INDEX = commands.Basic.Deliver.index  # class 60, method 60
_DELIVERY_TAG = struct.Struct(">qB")  # delivery tag (signed, as pamqp has it), then `redelivered`

ReceivedFrame = tuple[int, int, Any]

# A content header: class id, weight, body size, then the first 16 property flags.
_CONTENT_HEADER = struct.Struct(">HHQH")
# The properties decoded here, in wire order: flag, attribute, short string (else an octet).
# Others — headers (a table), timestamp, cluster id, a continued flag word — send the whole
# header to pamqp.
_Properties = commands.Basic.Properties
_SIMPLE_PROPERTIES = tuple(
    (_Properties.flags[name], name, name not in ("delivery_mode", "priority"))
    for name in _Properties.__slots__
    if name not in ("headers", "timestamp", "cluster_id")
)
_SIMPLE_FLAGS = sum(flag for flag, _, _ in _SIMPLE_PROPERTIES)
# Every property as pamqp's constructor leaves it when not given.
_UNSET = tuple((name, "" if name == "cluster_id" else None) for name in _Properties.__slots__)


def _short_str(payload: bytes, pos: int) -> tuple[str, int]:
    """An AMQP short string at `pos` (a length octet, then UTF-8); and where the next field is."""
    end = pos + 1 + payload[pos]
    return payload[pos + 1 : end].decode(), end


class Delivery(commands.Basic.Deliver):
    """A `Basic.Deliver` decoded here; `header` and `body` are set when its content frames came
    with it in the same read (then aiormq's channel reads no more frames for it)."""

    header: ContentHeader | None = None
    body: bytes = b""


def _deliver(payload: bytes) -> Delivery:
    """Decode a Basic.Deliver method's arguments (after the method index)."""
    consumer_tag, pos = _short_str(payload, 4)
    delivery_tag, bits = _DELIVERY_TAG.unpack_from(payload, pos)
    exchange, pos = _short_str(payload, pos + _DELIVERY_TAG.size)
    routing_key, _ = _short_str(payload, pos)
    # The attributes pamqp's own decoding sets; its constructor's validation is for outgoing
    # frames (Deliver's checks nothing).
    frame = Delivery.__new__(Delivery)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = bool(bits & 1)
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def _content_header(payload: bytes) -> ContentHeader | None:
    """Decode a content header whose properties are all simple ones; None: pamqp's to do."""
    class_id, weight, body_size, flags = _CONTENT_HEADER.unpack_from(payload)
    if flags & ~_SIMPLE_FLAGS:
        return None
    properties = _Properties.__new__(_Properties)
    for name, value in _UNSET:
        setattr(properties, name, value)
    pos = _CONTENT_HEADER.size
    for flag, name, text in _SIMPLE_PROPERTIES:
        if flags & flag:
            if text:
                value, pos = _short_str(payload, pos)
                setattr(properties, name, value)
            else:
                setattr(properties, name, payload[pos])
                pos += 1
    header = ContentHeader.__new__(ContentHeader)
    header.class_id = class_id
    header.weight = weight
    header.body_size = body_size
    header.properties = properties
    return header


class BufferedFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's FrameReceiver, reading the socket in chunks rather than frame by frame."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._rest = b""
        self._frames: deque[ReceivedFrame] = deque()
        self._held: tuple[int, int, int, Delivery] | None = None

    async def get_frame(self) -> ReceivedFrame:
        while not self._frames:
            await self._read()
        return self._frames.popleft()

    async def _read(self) -> None:
        # As aiormq's: an end of stream already there ends the iteration; one that comes while
        # we wait is the server gone, an error — the error is what makes a robust connection
        # reconnect.
        if not self._rest and self.reader.at_eof():
            raise StopAsyncIteration
        try:
            chunk = await self.reader.read(READ_SIZE)
        except OSError as exc:  # ConnectionResetError and the rest, as aiormq words them
            raise AMQPConnectionError(f"Server communication error: {exc!r}") from exc
        if not chunk:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(self._rest)} bytes of a frame not yet complete"
            )
        data = self._rest + chunk if self._rest else chunk
        if not self.started:
            if len(data) < len(b"AMQP"):
                self._rest = data  # too little yet to tell a frame from a refusal
                return
            if data.startswith(b"AMQP"):  # the server refused our protocol version
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        self._rest = data[self._split(data) :]

    def _split(self, data: bytes) -> int:
        """Decode every complete frame in `data` onto the queue; return where the rest starts."""
        pos, size = 0, len(data)
        while size - pos >= _HEADER_SIZE:
            frame_type, channel, length = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER_SIZE + length  # the frame-end octet
            if end >= size:
                break
            if data[end] != _FRAME_END:
                raise InvalidFrameError(f"frame on channel {channel} does not end in 0xCE")
            start = pos + _HEADER_SIZE
            frame: Any = None
            if frame_type == _FRAME_BODY:
                frame = ContentBody(data[start:end])
            elif frame_type == _FRAME_HEADER and length >= _CONTENT_HEADER.size:
                try:
                    frame = _content_header(data[start:end])
                except (IndexError, UnicodeDecodeError) as exc:
                    raise InvalidFrameError(f"malformed content header: {exc!r}") from exc
            elif (
                frame_type == _FRAME_METHOD
                and length >= 4
                and _METHOD_INDEX.unpack_from(data, start)[0] == _DELIVER_INDEX
            ):
                try:
                    frame = _deliver(data[start:end])
                except (IndexError, struct.error, UnicodeDecodeError) as exc:
                    raise InvalidFrameError(f"malformed Basic.Deliver: {exc!r}") from exc
            if frame is None:
                try:
                    _, _, frame = pamqp.frame.unmarshal(data[pos : end + 1])
                except PAMQPException as exc:
                    raise InvalidFrameError(str(exc)) from exc
            self._add(end + 1 - pos, channel, frame)
            pos = end + 1
        self._flush()
        return pos

    def _add(self, weight: int, channel: int, frame: Any) -> None:
        """Queue a frame, joining a Delivery's header and single body frame onto it.

        `_held` is a Delivery (with its header, once that came) whose content may still follow
        in this read; any other frame, or the end of the read, sends it on as it is, and
        aiormq's channel reads its content frames as they come.
        """
        held = self._held
        if held is not None:
            deliver_weight, header_weight, held_channel, delivery = held
            if channel == held_channel:
                if delivery.header is None and isinstance(frame, ContentHeader):
                    delivery.header = frame
                    if frame.body_size:
                        self._held = (deliver_weight, weight, channel, delivery)
                    else:
                        self._frames.append((deliver_weight + weight, channel, delivery))
                        self._held = None
                    return
                header = delivery.header
                if (
                    header is not None
                    and type(frame) is ContentBody
                    and len(frame.value) == header.body_size
                ):
                    delivery.body = frame.value
                    whole = deliver_weight + header_weight + weight
                    self._frames.append((whole, channel, delivery))
                    self._held = None
                    return
            self._flush()
        if type(frame) is Delivery:
            self._held = (weight, 0, channel, frame)
        else:
            self._frames.append((weight, channel, frame))

    def _flush(self) -> None:
        """Send a held Delivery on without its content: its frames go on one by one."""
        held = self._held
        if held is None:
            return
        self._held = None
        deliver_weight, header_weight, channel, delivery = held
        header = delivery.header
        delivery.header = None
        self._frames.append((deliver_weight, channel, delivery))
        if header is not None:
            self._frames.append((header_weight, channel, header))


# Consumers called directly, by channel and consumer tag (see `consume_inline`).
_inline: weakref.WeakKeyDictionary[Any, dict[str, Callable[[DeliveredMessage], None]]] = (
    weakref.WeakKeyDictionary()
)
_aiormq_on_deliver_frame = aiormq.channel.Channel._on_deliver_frame


def consume_inline(
    channel: AbstractChannel, consumer_tag: str, handler: Callable[[DeliveredMessage], None]
) -> None:
    """Have `channel` call `handler` directly with each message for `consumer_tag`.

    Register it before `basic_consume` with that tag, so that every message takes this path
    (a message on aiormq's task path would reach the handler after later ones). `handler` must
    not block: it runs in the channel's reading loop.
    """
    _inline.setdefault(channel, {})[consumer_tag] = handler


async def _on_deliver_frame(self: Any, frame: Any) -> None:
    """aiormq's `Channel._on_deliver_frame`, but a whole `Delivery` needs no more frames and
    an inline consumer is called directly rather than in a task of its own."""
    handler = _inline.get(self, {}).get(frame.consumer_tag)
    whole = isinstance(frame, Delivery) and frame.header is not None
    if handler is None and not whole:
        await _aiormq_on_deliver_frame(self, frame)  # a Deliver as aiormq handles it
        return
    if whole:
        message = DeliveredMessage(
            delivery=frame, header=frame.header, body=frame.body, channel=self
        )
    else:
        header = await self._Channel__get_content_header()
        message = await self._read_content(frame, header)
    if handler is not None:
        try:
            handler(message)
        except Exception:
            log.exception("inline consumer failed", extra={"consumer_tag": frame.consumer_tag})
        return
    consumer = self.consumers.get(frame.consumer_tag)
    if consumer is not None:
        task = self.create_task(consumer(message))
        task.add_done_callback(self._on_consumer_done)


def install() -> None:
    """Make aiormq read frames with `BufferedFrameReceiver` on connections opened from now on,
    and hand whole deliveries and inline consumers their messages as described above."""
    aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]
    aiormq.channel.Channel._on_deliver_frame = _on_deliver_frame  # type: ignore[method-assign]
