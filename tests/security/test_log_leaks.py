"""No secret in any log line: a full run at DEBUG, every byte of output searched.

migrate → accounts/keys create (CLI) → API (create webhook, test delivery, a wrong key) →
worker delivering published events, one after a retry. The API keys, the webhook secret and
the Fernet key must not appear in any process's stdout or stderr, nor on a /metrics page.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from cryptography.fernet import Fernet

from engine.core.signing import verify
from tests.chaos.harness import PYTHON, ROOT, Proc, engine_env, free_port, make_event, publish
from tests.receiver import Receiver


def run_logged(env: dict[str, str], outputs: list[str], *args: str) -> dict[str, str]:
    result = subprocess.run(
        [PYTHON, "-m", "engine", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    # stdout is the command's JSON result, which is meant to show a new key once; logs go to
    # stderr. For the other commands stdout is searched too.
    outputs.append(result.stderr)
    if args[0] not in {"accounts", "keys"}:
        outputs.append(result.stdout)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, str] = orjson.loads(result.stdout)
    return parsed


@pytest.mark.slow
async def test_a_full_run_at_debug_logs_no_key_and_no_secret(
    private_database_url: str, amqp_url: str, ca_file: Path, receiver: Receiver, tmp_path: Path
) -> None:
    fernet_key = Fernet.generate_key().decode()
    api_port = free_port()
    env = engine_env(
        database_url=private_database_url,
        amqp_url=amqp_url,
        ca_file=ca_file,
        secret_key=fernet_key,
        log_level="DEBUG",
        api_port=str(api_port),
        retry_schedule="200ms,200ms",
        delivery_timeout="5",
    )
    outputs: list[str] = []
    run_logged(env, outputs, "migrate")
    account = run_logged(env, outputs, "accounts", "create", "--name", "Leak", "--plan", "business")
    api_key = account["apiKey"]
    live_key = run_logged(
        env, outputs, "keys", "create", "--account", account["accountId"], "--mode", "live"
    )["apiKey"]
    wrong_key = "sk_test_" + "z" * 40

    api = Proc("api", ["api"], env, tmp_path).start()
    worker = Proc("worker", ["worker"], env, tmp_path)
    base = f"http://127.0.0.1:{api_port}/api/v1"
    try:
        await api.wait_http(f"http://127.0.0.1:{api_port}/healthz")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/webhooks", headers={"X-API-Key": wrong_key}) as r:
                assert r.status == 401
            auth = {"X-API-Key": api_key}
            body = {
                "url": receiver.url + "/hook",
                "events": ["document.uploaded", "compliance.warning"],
                "description": "log leak test",
            }
            async with http.post(f"{base}/webhooks", json=body, headers=auth) as r:
                assert r.status == 201, await r.text()
                webhook = await r.json()
            secret = webhook["secret"]
            async with http.post(f"{base}/webhooks/{webhook['id']}/test", headers=auth) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["status"] == "succeeded"
            # A bad request that names the secret field must not echo anything back or log it.
            async with http.put(
                f"{base}/webhooks/{webhook['id']}", json={"secret": secret}, headers=auth
            ) as r:
                assert r.status == 400
                assert secret not in await r.text()
            async with http.get(f"{base}/webhooks/{webhook['id']}/deliveries", headers=auth) as r:
                assert r.status == 200
            # Any mode's key, and the live one for a 404 of a test-mode webhook.
            async with http.get(
                f"{base}/webhooks/{webhook['id']}", headers={"X-API-Key": live_key}
            ) as r:
                assert r.status == 404

            # The worker: the first attempt of every event fails, the retry succeeds.
            seen: set[str] = set()

            async def fail_first(request: web.Request, _: bytes) -> web.StreamResponse:
                delivery = request.headers["X-CargoLint-Delivery"]
                if delivery in seen:
                    return web.Response(text="ok")
                seen.add(delivery)
                return web.Response(status=500, text="try again")

            receiver.handler = fail_first
            worker.start()
            await worker.ready()
            run = account["accountId"][-6:]
            events = [make_event(i, account["accountId"], run=run) for i in range(3)]
            assert await publish(amqp_url, events) == 3
            received = await receiver.wait_for(1 + 2 * len(events), timeout=30)
            for request in received:
                signature = request.headers["X-CargoLint-Signature"]
                assert verify(secret, request.body, signature)

            pages = []
            for port in (env["CARGOLINT_METRICS_PORT"], str(api_port)):
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    pages.append(await r.text())
    finally:
        worker_code = await worker.terminate()
        api_code = await api.terminate()
    outputs.extend([api.output(), worker.output(), *pages])
    assert worker_code == 0, worker.output()[-3000:]
    assert api_code == 0, api.output()[-3000:]

    everything = "\n".join(outputs)
    lines = [line for line in everything.splitlines() if line.startswith("{")]
    assert len(lines) > 10, everything[-2000:]  # the capture did catch the logs
    assert any('"worker started"' in line for line in lines)
    assert webhook["id"] in everything  # ids are logged, so a leak would have been caught too
    assert any('"level":"debug"' in line for line in lines), "DEBUG was not in effect"
    needles = {
        "API key": api_key,
        "API key body": api_key.removeprefix("sk_test_"),
        "live API key": live_key,
        "unknown API key": wrong_key,
        "webhook secret": secret,
        "webhook secret body": secret.removeprefix("whsec_test_"),
        "Fernet key": fernet_key,
    }
    leaks = [name for name, needle in needles.items() if needle in everything]
    assert leaks == [], f"found in logs: {leaks}"
