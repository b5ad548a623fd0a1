"""The `cargolint-webhooks` command: parse, build settings, start one thing."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine import __version__
from engine.logs import setup_logging
from engine.settings import Settings, SettingsError

if TYPE_CHECKING:
    from engine.store.accounts import IssuedKey, KeyInfo

__all__ = ["main"]

POSTGRES_HINT = (
    "PostgreSQL is not reachable at {where}; start it with "
    "'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'"
)
RABBITMQ_HINT = "RabbitMQ is not reachable at {where}; start it with 'rabbitmq-server -detached'"


_PLAN = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def _plan(value: str) -> str:
    """Any plan name (webhooks are for business and enterprise only), as a lowercase name."""
    plan = value.strip().lower()
    if not _PLAN.fullmatch(plan):
        raise argparse.ArgumentTypeError(
            f"invalid plan {value!r}: a name such as business, enterprise or starter"
        )
    return plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cargolint-webhooks",
        description="CargoLint Webhooks: the API and the delivery engine.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("migrate", help="create the database if missing and apply migrations")
    sub.add_parser("api", help="serve the management API")
    sub.add_parser("worker", help="run the delivery engine")
    sub.add_parser("demo", help="everything locally, end to end, for a first look")
    bench = sub.add_parser("bench", help="run the benchmark (see bench/)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for `python -m bench`")

    accounts = sub.add_parser("accounts", help="manage accounts").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = accounts.add_parser("create", help="create an account and its first API key")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--plan",
        required=True,
        type=_plan,
        help="the account's plan; only business and enterprise accounts may use webhooks",
    )
    create.add_argument("--mode", default="test", choices=["test", "live"])

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    key = keys.add_parser("create", help="create another API key for an account")
    key.add_argument("--account", required=True, metavar="ACCOUNT_ID")
    key.add_argument("--mode", default="test", choices=["test", "live"])
    listing = keys.add_parser("list", help="list an account's API keys (never the keys)")
    listing.add_argument("--account", required=True, metavar="ACCOUNT_ID")
    revoke = keys.add_parser("revoke", help="revoke an API key: its requests get 401 at once")
    revoke.add_argument("key_id", metavar="KEY_ID")
    return parser


def _print_json(value: Any) -> None:
    # The stdlib's spacing, as docs/contract.md §5 and the README print it: {"accountId": …}
    sys.stdout.write(json.dumps(value) + "\n")


async def _migrate(settings: Settings, _: argparse.Namespace) -> int:
    from engine.store.migrate import migrate  # noqa: PLC0415 - each command loads only its own code

    applied = await migrate(settings.database_url, secret_keys=settings.secret_keys)
    _print_json({"applied": applied})
    return 0


async def _accounts(settings: Settings, args: argparse.Namespace) -> int:
    from engine.api.auth import WEBHOOK_PLANS  # noqa: PLC0415
    from engine.store import accounts  # noqa: PLC0415

    pool_conn = await _connect_db(settings)
    try:
        issued = await accounts.open_account(
            pool_conn, name=args.name, plan=args.plan, mode=args.mode
        )
    finally:
        await pool_conn.close()
    _print_issued(issued)
    if args.plan not in WEBHOOK_PLANS:
        # Any plan name is allowed, so a typo of `business` would pass silently without this.
        sys.stderr.write(
            f"note: plan {args.plan!r} has no webhook access "
            f"(only {', '.join(sorted(WEBHOOK_PLANS))}); its keys will get 403 plan_required\n"
        )
    return 0


def _print_issued(issued: IssuedKey) -> None:
    _print_json({"accountId": issued.account_id, "keyId": issued.key_id, "apiKey": issued.api_key})


def _key_json(key: KeyInfo) -> dict[str, Any]:
    from engine.core.times import rfc3339  # noqa: PLC0415

    revoked = None if key.revoked_at is None else rfc3339(key.revoked_at)
    return {
        "keyId": key.key_id,
        "mode": key.mode,
        "createdAt": rfc3339(key.created_at),
        "revokedAt": revoked,
    }


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from engine.store import accounts  # noqa: PLC0415

    conn = await _connect_db(settings)
    try:
        if args.action == "create":
            issued = await accounts.create_key(conn, account_id=args.account, mode=args.mode)
            if issued is None:
                return _fail(f"account {args.account} does not exist")
            _print_issued(issued)
        elif args.action == "list":
            listed = await accounts.list_keys(conn, args.account)
            if listed is None:
                return _fail(f"account {args.account} does not exist")
            _print_json([_key_json(k) for k in listed])
        else:
            revoked = await accounts.revoke_key(conn, args.key_id)
            if revoked is None:
                return _fail(f"API key {args.key_id} does not exist")
            _print_json(_key_json(revoked))
    finally:
        await conn.close()
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(message + "\n")
    return 1


async def _connect_db(settings: Settings) -> Any:
    from engine.store.db import connect  # noqa: PLC0415

    return await connect(settings.database_url)


async def _api(settings: Settings, _: argparse.Namespace) -> int:
    from engine.api.app import serve  # noqa: PLC0415

    await serve(settings)
    return 0


async def _worker(settings: Settings, _: argparse.Namespace) -> int:
    from engine.worker.main import run  # noqa: PLC0415

    return await run(settings)


async def _demo(settings: Settings, _: argparse.Namespace) -> int:
    from engine.demo import run  # noqa: PLC0415

    return await run(settings)


Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]
COMMANDS: dict[str, Command] = {
    "migrate": _migrate,
    "accounts": _accounts,
    "keys": _keys,
    "api": _api,
    "worker": _worker,
    "demo": _demo,
}


def _unreachable(exc: BaseException, settings: Settings) -> str | None:
    """A one-line hint when Postgres or RabbitMQ cannot be reached, else None."""
    text = f"{type(exc).__module__}.{type(exc).__name__}"
    if "aiormq" in text or "aio_pika" in text or "AMQP" in str(exc):
        return RABBITMQ_HINT.format(where=settings.amqp_url.rsplit("@", 1)[-1])
    if isinstance(exc, OSError | TimeoutError):
        where = settings.database_url.rsplit("@", 1)[-1]
        return POSTGRES_HINT.format(where=where)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # The benchmark parses its own options (argparse's REMAINDER would refuse `--quick`).
        from bench.__main__ import main as bench_main  # noqa: PLC0415

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    setup_logging(settings.log_level)
    try:
        import uvloop  # noqa: PLC0415

        runner: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        return runner(COMMANDS[args.command](settings, args))
    except KeyboardInterrupt:
        return 130
    except (OSError, TimeoutError) as exc:
        hint = _unreachable(exc, settings)
        if hint is None:
            raise
        sys.stderr.write(hint + "\n")
        return 3
