"""The buffered frame reader: the same frames as pamqp decodes, however the bytes arrive."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any

import aiormq
import aiormq.channel
import aiormq.connection
import pamqp.frame
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from engine.worker import amqp_frames
from engine.worker.amqp_frames import BufferedFrameReceiver, Delivery


def _deliver(tag: int, *, redelivered: bool = False, key: str = "document.uploaded") -> Any:
    return commands.Basic.Deliver(
        consumer_tag="ctag1.0123456789abcdef",
        delivery_tag=tag,
        redelivered=redelivered,
        exchange="cargolint.events",
        routing_key=key,
    )


# Properties as publishers set them: the first two are decoded here, the rest by pamqp.
PROPERTIES = (
    {"content_type": "application/json", "delivery_mode": 2},
    {
        "content_type": "application/json",
        "content_encoding": "identity",
        "delivery_mode": 1,
        "priority": 9,
        "correlation_id": "c-1",
        "reply_to": "amq.rabbitmq.reply-to",
        "expiration": "60000",
        "message_id": "évt_ü1",
        "message_type": "document.uploaded",
        "user_id": "guest",
        "app_id": "uploader",
    },
    {"content_type": "application/json", "delivery_mode": 2, "headers": {"x-n": 1}},
    {"delivery_mode": 2, "timestamp": datetime(2026, 11, 28, 5, 0, tzinfo=UTC)},
    {"content_type": "text/plain", "headers": {"a": {"b": [1, "c"]}}, "app_id": "x"},
)


def _message(tag: int, body: bytes, *, channel: int = 1, frame_max: int = 4096) -> list[bytes]:
    """A delivered message as the broker frames it: method, header, body in frame_max pieces."""
    props = commands.Basic.Properties(**PROPERTIES[tag % len(PROPERTIES)])
    frames = [
        pamqp.frame.marshal(_deliver(tag, redelivered=tag % 2 == 0, key=f"k.{tag}"), channel),
        pamqp.frame.marshal(ContentHeader(0, len(body), props), channel),
    ]
    step = frame_max - 8
    pieces = (body[at : at + step] for at in range(0, len(body), step))
    return frames + [pamqp.frame.marshal(ContentBody(piece), channel) for piece in pieces]


def _plain(frame: Any) -> Any:
    """A Delivery as pamqp's own Basic.Deliver, the content it carries left out."""
    if not isinstance(frame, Delivery):
        return frame
    plain = commands.Basic.Deliver.__new__(commands.Basic.Deliver)
    for name in ("consumer_tag", "delivery_tag", "redelivered", "exchange", "routing_key"):
        setattr(plain, name, getattr(frame, name))
    return plain


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    return type(a) is type(b) and vars(a) == vars(b)


def _unjoin(got: list[Any]) -> list[Any]:
    """The frames as the broker sent them: a joined Delivery as its method, header and body."""
    frames: list[Any] = []
    for weight, channel, frame in got:
        if isinstance(frame, Delivery) and frame.header is not None:
            header_weight = len(pamqp.frame.marshal(frame.header, channel))
            content: list[tuple[int, int, Any]] = [(header_weight, channel, frame.header)]
            if frame.header.body_size:
                body = ContentBody(frame.body)
                content.append((len(pamqp.frame.marshal(body, channel)), channel, body))
            rest = weight - sum(w for w, _, _ in content)
            frames += [(rest, channel, _plain(frame)), *content]
        else:
            frames.append((weight, channel, frame))
    return frames


async def _receive(
    stream: bytes, chunks: list[int], *, joined: bool = False
) -> tuple[list[Any], BaseException | None]:
    """Feed `stream` in pieces of the given sizes while the reader reads, then end the stream
    (with no pieces: all of it and its end before reading); collect what the reader yields,
    joined deliveries taken apart again unless `joined`."""
    reader = asyncio.StreamReader()
    receiver = BufferedFrameReceiver(reader)
    got: list[Any] = []
    if not chunks:
        reader.feed_data(stream)
        reader.feed_eof()

    async def feed() -> None:
        if not chunks:
            return
        at = 0
        for size in chunks:
            reader.feed_data(stream[at : at + size])
            at += size
            await asyncio.sleep(0)
        reader.feed_data(stream[at:])
        await asyncio.sleep(0.01)  # the reader has it all and waits for more
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    error: BaseException | None = None
    try:
        async for triple in receiver:
            got.append(triple)  # noqa: PERF401 - what came before an error is kept
    except Exception as exc:  # the test looks at which
        error = exc
    await feeder
    return (got if joined else _unjoin(got)), error


async def test_frames_decode_as_pamqp_does_whatever_the_chunking() -> None:
    frames: list[bytes] = [pamqp.frame.marshal(Heartbeat(), 0)]
    for tag in range(1, 40):
        frames += _message(tag, bytes(random.randrange(256) for _ in range(tag * 300)))
    frames.append(pamqp.frame.marshal(commands.Basic.Ack(delivery_tag=7, multiple=True), 1))
    stream = b"".join(frames)
    expected = [pamqp.frame.unmarshal(f) for f in frames]

    rng = random.Random(6)
    for chunking in ([len(stream) - 1], [1] * 300, [rng.randrange(1, 9000) for _ in range(60)]):
        got, error = await _receive(stream, chunking)
        # The stream ended while the reader waited for more: the server went away.
        assert isinstance(error, AMQPConnectionError), error
        assert len(got) == len(expected)
        for (weight, channel, frame), (e_weight, e_channel, e_frame) in zip(
            got, expected, strict=True
        ):
            assert (weight, channel) == (e_weight, e_channel)
            assert _same(frame, e_frame), (frame, e_frame)


async def test_deliver_decoded_here_matches_pamqp_field_by_field() -> None:
    for tag, redelivered, key in ((1, False, ""), (2**62 + 5, True, "ü.κ" * 20), (9, True, "a")):
        marshalled = pamqp.frame.marshal(_deliver(tag, redelivered=redelivered, key=key), 3)
        got, error = await _receive(marshalled, [])
        assert error is None
        ((_, channel, frame),) = got
        _, _, expected = pamqp.frame.unmarshal(marshalled)
        assert channel == 3
        assert isinstance(frame, commands.Basic.Deliver)
        assert _same(frame, expected)
        assert (frame.delivery_tag, frame.redelivered, frame.routing_key) == (
            tag,
            redelivered,
            key,
        )


async def test_a_message_with_simple_properties_is_decoded_without_pamqp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = b"".join(_message(len(PROPERTIES), b"x" * 5000) + _message(1, b"y"))  # simple ones
    expected = [pamqp.frame.unmarshal(f) for f in [*_message(0, b"x" * 5000), *_message(1, b"y")]]

    def refuse(_: bytes) -> None:
        raise AssertionError("pamqp decoded a frame")

    monkeypatch.setattr(pamqp.frame, "unmarshal", refuse)
    got, error = await _receive(stream, [])
    assert error is None
    assert [(w, c) for w, c, _ in got] == [(w, c) for w, c, _ in expected]
    assert all(_same(f, e) for (_, _, f), (_, _, e) in zip(got, expected, strict=True))


async def test_a_message_read_whole_is_handed_on_as_one_delivery() -> None:
    bodies = [b"x" * 1024, b"", b"y" * 9000, b"z"]  # the third over frame_max: three body frames
    stream = b"".join(frame for n, body in enumerate(bodies) for frame in _message(n + 1, body))
    got, error = await _receive(stream, [], joined=True)
    assert error is None
    kinds = [type(f).__name__ for _, _, f in got]
    assert kinds == ["Delivery", "Delivery", "Delivery", "ContentHeader"] + ["ContentBody"] * 3 + [
        "Delivery"
    ]
    whole = [f for _, _, f in got if isinstance(f, Delivery) and f.header is not None]
    assert [(f.delivery_tag, f.body) for f in whole] == [(1, bodies[0]), (2, b""), (4, b"z")]
    assert all(f.header is not None and f.header.body_size == len(f.body) for f in whole)
    assert sum(w for w, _, _ in got) == len(stream)


async def test_a_message_cut_by_a_read_goes_on_frame_by_frame() -> None:
    first, second = _message(1, b"a" * 100), _message(2, b"b" * 100)
    stream = b"".join(first + second)
    # The first read ends inside the first message's body frame.
    got, error = await _receive(stream, [len(b"".join(first)) - 3], joined=True)
    assert isinstance(error, AMQPConnectionError)  # (the end of the test's stream)
    frames = [f for _, _, f in got]
    assert isinstance(frames[0], Delivery) and frames[0].header is None
    assert isinstance(frames[1], ContentHeader) and isinstance(frames[2], ContentBody)
    assert isinstance(frames[3], Delivery) and frames[3].body == b"b" * 100
    assert len(frames) == 4


async def test_broken_streams_raise_aiormqs_errors() -> None:
    whole = b"".join(_message(1, b"x" * 100))
    _, error = await _receive(whole[:-3], [])
    assert isinstance(error, AMQPConnectionError)
    assert "unexpectedly closed" in str(error)

    bad_end = bytearray(pamqp.frame.marshal(Heartbeat(), 0))
    bad_end[-1] = 0
    _, error = await _receive(bytes(bad_end), [])
    assert isinstance(error, InvalidFrameError)

    _, error = await _receive(b"AMQP\x00\x00\x09\x01", [])
    assert isinstance(error, ProtocolSyntaxError)

    got, error = await _receive(b"", [])
    assert got == [] and error is None  # an end of stream already there ends the iteration

    # The first bytes may come one at a time: a refusal is still told from a frame.
    _, error = await _receive(b"AMQP\x00\x00\x09\x01", [1] * 8)
    assert isinstance(error, ProtocolSyntaxError)
    heartbeat = pamqp.frame.marshal(Heartbeat(), 0)
    got, error = await _receive(heartbeat, [1] * len(heartbeat))
    assert [type(f) for _, _, f in got] == [Heartbeat]


async def _queue_of(channel: Any, bodies: list[bytes]) -> str:
    """A throwaway queue on the real broker holding `bodies`, in order."""
    declared = await channel.queue_declare(exclusive=True, auto_delete=True)
    queue = declared.queue
    assert queue is not None
    for body in bodies:
        await channel.basic_publish(body, routing_key=queue)
    return str(queue)


async def test_installed_it_carries_a_real_connection(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With install(), aiormq's connections read through it: handshake, consume and ack."""
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", aiormq.connection.FrameReceiver)
    reads = 0
    original = BufferedFrameReceiver._read

    async def counted(self: BufferedFrameReceiver) -> None:
        nonlocal reads
        reads += 1
        await original(self)

    monkeypatch.setattr(BufferedFrameReceiver, "_read", counted)
    amqp_frames.install()

    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel()
        bodies = [bytes([n]) * (n * 1000) for n in range(1, 30)]  # some over frame_max
        queue = await _queue_of(channel, bodies)
        received: list[bytes] = []
        done = asyncio.Event()

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            received.append(message.body)
            if len(received) == len(bodies):
                assert message.delivery_tag is not None
                await channel.basic_ack(message.delivery_tag, multiple=True)
                done.set()

        await channel.basic_consume(queue, on_message)
        await asyncio.wait_for(done.wait(), 10)
        assert received == bodies
    finally:
        await connection.close()
    assert reads > 0


async def test_an_inline_consumer_gets_every_message_in_order_without_a_task_each(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", aiormq.connection.FrameReceiver)
    monkeypatch.setattr(
        aiormq.channel.Channel, "_on_deliver_frame", aiormq.channel.Channel._on_deliver_frame
    )
    amqp_frames.install()
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel()
        # Whole ones, an empty one, some over frame_max (their content read frame by frame).
        bodies = [bytes([n % 256]) * ((n * 4099) % 300_000) for n in range(200)]
        queue = await _queue_of(channel, bodies)
        inline: list[tuple[int, bytes]] = []
        tasks: list[bytes] = []
        done = asyncio.Event()

        def take(message: aiormq.abc.DeliveredMessage) -> None:
            assert message.delivery_tag is not None
            inline.append((message.delivery_tag, message.body))
            if len(inline) == len(bodies):
                done.set()

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            tasks.append(message.body)

        amqp_frames.consume_inline(channel, "ctag-inline", take)
        await channel.basic_consume(queue, on_message, consumer_tag="ctag-inline")
        await asyncio.wait_for(done.wait(), 20)
        await channel.basic_ack(inline[-1][0], multiple=True)
        assert [body for _, body in inline] == bodies
        assert [tag for tag, _ in inline] == list(range(1, len(bodies) + 1))
        assert tasks == []
    finally:
        await connection.close()
