"""CARGOLINT_QUEUE_TYPE and RabbitMQ's refusals of another queue type, read for the operator."""

from __future__ import annotations

import pytest

from engine.settings import Settings, SettingsError
from engine.worker.topology import existing_queue_type


@pytest.mark.parametrize(
    ("raw", "queue_type"),
    [(None, "classic"), ("", "classic"), ("classic", "classic"), (" Quorum ", "quorum")],
)
def test_queue_type_setting(raw: str | None, queue_type: str) -> None:
    env = {} if raw is None else {"CARGOLINT_QUEUE_TYPE": raw}
    assert Settings.from_env(env).queue_type == queue_type


@pytest.mark.parametrize("raw", ["stream", "mirrored", "quorum,classic"])
def test_another_queue_type_is_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"CARGOLINT_QUEUE_TYPE": raw})
    assert caught.value.variable == "CARGOLINT_QUEUE_TYPE"
    assert str(caught.value) == (
        f"CARGOLINT_QUEUE_TYPE: must be classic or quorum, got {raw.lower()!r}"
    )


_PREFIX = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost 'v': "


@pytest.mark.parametrize(
    ("reply", "existing"),
    [
        # RabbitMQ 3.10's words, as the broker here answers.
        (_PREFIX + "received the value 'quorum' of type 'longstr' but current is none", "classic"),
        (
            _PREFIX + "received none but current is the value 'quorum' of type 'longstr'",
            "quorum",
        ),
        (_PREFIX + "received 'classic' but current is 'quorum'", "quorum"),
        (_PREFIX + "received 'quorum' but current is 'stream'", "stream"),
        (
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost 'v': "
            "received none but current is the value '10' of type 'signedint'",
            None,
        ),
        (_PREFIX + "something new", None),
    ],
)
def test_the_existing_queue_type_is_read_from_the_refusal(reply: str, existing: str | None) -> None:
    assert existing_queue_type(reply) == existing
