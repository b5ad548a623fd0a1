"""Secrets at rest: SecretBox sealing and rotation, `migrate` re-encryption, API keys as hashes."""

from __future__ import annotations

import hashlib
import os
import subprocess
from typing import Any

import asyncpg
import orjson
import pytest
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.crypto import SecretBox, new_webhook_secret
from engine.store.migrate import migrate
from engine.store.webhooks import create_webhook, load_active
from tests.security.conftest import PYTHON, columns_containing

PROPERTY = settings(max_examples=100, deadline=None)
K1, K2, K3 = (Fernet.generate_key().decode() for _ in range(3))
secrets_ = st.text(min_size=0, max_size=200)


@PROPERTY
@given(secrets_)
def test_without_a_key_secrets_are_marked_plain_and_round_trip(secret: str) -> None:
    box = SecretBox(())
    assert not box.encrypting
    assert box.open(box.seal(secret)) == secret
    assert not box.needs_reseal(box.seal(secret))


@PROPERTY
@given(secrets_)
def test_with_a_key_secrets_are_encrypted_and_round_trip(secret: str) -> None:
    box = SecretBox((K1,))
    sealed = box.seal(secret)
    assert sealed.startswith("fernet:")
    assert box.open(sealed) == secret
    assert sealed != box.seal(secret)  # a fresh IV each time: equal secrets do not show
    assert not box.needs_reseal(sealed)


@PROPERTY
@given(secrets_)
def test_rotation_new_key_first_old_key_still_opens(secret: str) -> None:
    old = SecretBox((K1,)).seal(secret)
    rotated = SecretBox((K2, K1))
    assert rotated.open(old) == secret
    assert rotated.needs_reseal(old)
    resealed = rotated.reseal(old)
    assert not rotated.needs_reseal(resealed)
    assert SecretBox((K2,)).open(resealed) == secret  # the old key can now be retired
    with pytest.raises(ValueError, match="not in CARGOLINT_SECRET_KEY"):
        SecretBox((K1,)).open(resealed)


@pytest.mark.parametrize(
    ("keys", "stored", "message"),
    [
        ((), "fernet:" + Fernet(K1.encode()).encrypt(b"s").decode(), "is not set"),
        ((K2,), "fernet:" + Fernet(K1.encode()).encrypt(b"s").decode(), "not in"),
        ((K1,), "fernet:garbage", "not in"),
        ((K1,), "whsec_test_unmarked", "unknown format"),
    ],
)
def test_secrets_that_cannot_be_opened_say_why_without_echoing(
    keys: tuple[str, ...], stored: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        SecretBox(keys).open(stored)
    text = str(info.value)
    assert stored not in text
    assert all(k not in text for k in (K1, K2))


def test_a_sealed_real_secret_does_not_contain_it() -> None:
    secret = new_webhook_secret("live")
    sealed = SecretBox((K1,)).seal(secret)
    assert secret not in sealed
    assert secret.removeprefix("whsec_live_") not in sealed


def test_plain_rows_need_resealing_only_once_a_key_is_set() -> None:
    plain = SecretBox(()).seal("whsec_test_x")
    assert not SecretBox(()).needs_reseal(plain)
    assert SecretBox((K1,)).needs_reseal(plain)


# ---------------------------------------------------------------- migrate re-encrypts


def cli(database_url: str, *args: str, keys: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGOLINT_")}
    env["CARGOLINT_DATABASE_URL"] = database_url
    env["CARGOLINT_LOG_LEVEL"] = "DEBUG"
    if keys is not None:
        env["CARGOLINT_SECRET_KEY"] = keys
    return subprocess.run(
        [PYTHON, "-m", "engine", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _secrets(conn: asyncpg.Connection[Any]) -> dict[str, str]:
    return {r["id"]: r["secret"] for r in await conn.fetch("SELECT id, secret FROM webhooks")}


@pytest.mark.slow
async def test_migrate_encrypts_plain_rows_and_rotates_old_key_rows(
    private_database_url: str,
) -> None:
    url = private_database_url
    await migrate(url)
    plain = {
        name: new_webhook_secret("test") for name in ("wh_plain1", "wh_plain2", "wh_old", "wh_cur")
    }
    stored = {
        "wh_plain1": SecretBox(()).seal(plain["wh_plain1"]),
        "wh_plain2": SecretBox(()).seal(plain["wh_plain2"]),
        "wh_old": SecretBox((K1,)).seal(plain["wh_old"]),
        "wh_cur": SecretBox((K2,)).seal(plain["wh_cur"]),
    }
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO accounts (id, name, plan) VALUES ('acct_sec', 'sec', 'business')"
        )
        for webhook_id, secret in stored.items():
            await conn.execute(
                """INSERT INTO webhooks (id, account_id, mode, url, events, secret)
                   VALUES ($1, 'acct_sec', 'test', 'https://example.com/h',
                           '{document.uploaded}', $2)""",
                webhook_id,
                secret,
            )

        result = cli(url, "migrate", keys=f"{K2},{K1}")
        assert result.returncode == 0, result.stderr
        after = await _secrets(conn)
        assert all(v.startswith("fernet:") for v in after.values())
        assert after["wh_cur"] == stored["wh_cur"]  # already current: left alone
        assert after["wh_old"] != stored["wh_old"]
        current = SecretBox((K2,))
        assert {k: current.open(v) for k, v in after.items()} == plain
        for secret in plain.values():
            assert await columns_containing(conn, secret) == []
        output = result.stdout + result.stderr
        for needle in [*plain.values(), K1, K2]:
            assert needle not in output

        # Idempotent: nothing left to do, nothing changes.
        again = cli(url, "migrate", keys=f"{K2},{K1}")
        assert again.returncode == 0, again.stderr
        assert orjson.loads(again.stdout) == {"applied": []}
        assert await _secrets(conn) == after

        # K1 retired: every row still opens, for the worker too.
        retired = cli(url, "migrate", keys=K2)
        assert retired.returncode == 0, retired.stderr
        targets = await load_active(conn, SecretBox((K2,)))
        assert {t.id: t.secret for t in targets} == plain
        # A worker holding only a wrong key still caches every webhook (its events still make
        # deliveries); a secret it cannot open fails when used, saying why, echoing nothing.
        wrong = await load_active(conn, SecretBox((K3,)))
        assert {t.id for t in wrong} == set(plain)
        for target in wrong:
            with pytest.raises(ValueError, match="not in CARGOLINT_SECRET_KEY") as caught:
                _ = target.secret
            assert plain[target.id] not in str(caught.value)
            assert plain[target.id] not in repr(target)
    finally:
        await conn.close()


async def test_a_bad_secret_key_is_refused_without_echoing_it(private_database_url: str) -> None:
    bad = "this-is-not-a-fernet-key-but-secret-material"
    result = cli(private_database_url, "migrate", keys=f"{K1},{bad}")
    assert result.returncode == 2
    assert "CARGOLINT_SECRET_KEY" in result.stderr
    assert "key 2" in result.stderr
    assert bad not in result.stderr + result.stdout
    assert K1 not in result.stderr + result.stdout


# ---------------------------------------------------------------- API keys and new secrets


@pytest.mark.slow
async def test_api_keys_and_webhook_secrets_are_never_stored_in_plain(
    private_database_url: str,
) -> None:
    url = private_database_url
    assert cli(url, "migrate", keys=K1).returncode == 0
    created = cli(url, "accounts", "create", "--name", "Sec", "--plan", "business", keys=K1)
    assert created.returncode == 0, created.stderr
    account = orjson.loads(created.stdout)
    key = account["apiKey"]
    assert key.startswith("sk_test_")
    assert key not in created.stderr

    more = cli(url, "keys", "create", "--account", account["accountId"], "--mode", "live", keys=K1)
    assert more.returncode == 0, more.stderr
    live_key = orjson.loads(more.stdout)["apiKey"]
    assert live_key.startswith("sk_live_")

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT key_hash, key_prefix FROM api_keys")
        assert sorted(bytes(r["key_hash"]) for r in rows) == sorted(
            hashlib.sha256(k.encode()).digest() for k in (key, live_key)
        )
        assert all(len(r["key_prefix"]) <= 12 for r in rows)
        for k in (key, live_key):
            assert await columns_containing(conn, k) == []
            assert await columns_containing(conn, k[8:]) == []  # not even the random part

        _, secret = await create_webhook(
            conn,
            account_id=account["accountId"],
            mode="test",
            url="https://example.com/hook",
            events=["document.uploaded"],
            active=True,
            description=None,
            box=SecretBox((K1,)),
            limit=10,
        )
        assert await columns_containing(conn, secret) == []
        assert await columns_containing(conn, secret.removeprefix("whsec_test_")) == []
    finally:
        await conn.close()
