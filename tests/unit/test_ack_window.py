"""AckWindow: a multiple-ack never covers a delivery tag that is not done with."""

from __future__ import annotations

import pytest

from engine.worker.acks import AckWindow

PATIENCE = 5.0


def _window(done: list[int], returned: tuple[int, ...] = ()) -> AckWindow[str]:
    window: AckWindow[str] = AckWindow(PATIENCE)
    for tag in done:
        window.done(tag, f"m{tag}")
    for tag in returned:
        window.returned(tag)
    return window


@pytest.mark.parametrize(
    ("done", "returned", "multiple", "through", "waiting"),
    [
        ([], (), None, 0, 0),
        ([1, 2, 3], (), "m3", 3, 0),
        ([3, 1, 2], (), "m3", 3, 0),  # processed out of order: still one ack, of the last
        ([2, 3], (), None, 0, 2),  # 1 not done yet: nothing may be acked
        ([1, 2, 4, 5], (), "m2", 2, 2),  # up to the gap only
        ([1, 3], (2,), "m3", 3, 0),  # a returned tag is settled, not a gap
        ([1], (2, 3), "m1", 3, 0),  # ...and never the tag acked (it is no longer unacked)
        ([], (1, 2), None, 2, 0),
    ],
)
def test_the_multiple_ack_stops_at_the_first_unsettled_tag(
    done: list[int],
    returned: tuple[int, ...],
    multiple: str | None,
    through: int,
    waiting: int,
) -> None:
    window = _window(done, returned)
    assert window.take(now=0.0) == (multiple, [])
    assert window.acked_through == through
    assert len(window) == waiting


def test_later_batches_continue_from_where_the_last_ack_stopped() -> None:
    window = _window([1, 2, 4])
    assert window.take(0.0) == ("m2", [])
    window.done(3, "m3")
    window.done(5, "m5")
    assert window.take(0.0) == ("m5", [])
    assert window.take(0.0) == (None, [])
    assert window.acked_through == 5


def test_messages_held_behind_a_gap_too_long_are_acked_one_by_one() -> None:
    window = _window([1, 3, 4])
    assert window.take(0.0) == ("m1", [])
    assert window.gap == 2
    assert window.take(PATIENCE - 0.1) == (None, [])
    assert window.take(PATIENCE) == (None, ["m3", "m4"])
    # The gap stays: later ones go one by one at once, and tag 2 is never covered.
    window.done(5, "m5")
    assert window.take(PATIENCE + 0.01) == (None, ["m5"])
    assert window.acked_through == 1
    # Should tag 2 arrive after all, one multiple-ack of it covers nothing acked before.
    window.done(2, "m2")
    window.done(6, "m6")
    assert window.take(PATIENCE + 0.02) == ("m6", [])
    assert window.acked_through == 6
    assert window.gap is None


def test_patience_counts_from_when_the_gap_was_first_seen() -> None:
    window = _window([1, 3])
    window.take(0.0)
    window.done(2, "m2")  # the gap fills in time
    window.done(5, "m5")  # a new gap at 4
    assert window.take(PATIENCE) == ("m3", [])
    assert window.gap == 4
    assert window.take(PATIENCE + 1.0) == (None, [])
    assert window.take(2 * PATIENCE) == (None, ["m5"])
