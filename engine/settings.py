"""Settings: one frozen dataclass read from the environment, validated at start-up.

Every error names the variable at fault, so an operator knows what to fix.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.backoff import DEFAULT_SCHEDULE, parse_duration, parse_schedule

__all__ = ["QUEUE_TYPES", "Settings", "SettingsError"]

# RabbitMQ queue types the worker can declare its queues as (`CARGOLINT_QUEUE_TYPE`).
QUEUE_TYPES = ("classic", "quorum")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A configuration variable is missing or malformed."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/cargolint"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    metrics_port: int = 9100
    delivery_timeout: float = 30.0
    retry_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    endpoint_rate: float = 100.0
    endpoint_concurrency: int = 10
    allow_http: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()
    ca_bundle: Path | None = None
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    shutdown_grace: float = 25.0
    retention: float = 30 * 86400.0  # seconds a finished delivery is kept (docs/retention.md)
    # A webhook whose attempts have all failed for this long is disabled (docs/contract.md §6).
    disable_after: float = 5 * 86400.0
    # Beyond the contract: tuning knobs with safe defaults.
    # The share of one Postgres backend the purge may use while it catches up with a backlog.
    # At a third the benchmark's throughput fell to 0.65 of the run without a purge (2 cores);
    # the steady state needs far less (a million deliveries a day is 12 a second).
    purge_share: float = 0.1
    dns_timeout: float = 5.0
    dns_servers: tuple[str, ...] = ()  # empty: the system's (resolv.conf)
    max_in_flight: int = 512
    prefetch: int = 1000
    poll_interval: float = 0.5
    worker_lease: float = 15.0
    cache_reload_interval: float = 60.0
    max_webhooks_per_account: int = 1000
    api_rate_limit: float = 100.0
    api_rate_burst: int = 500
    log_level: str = "INFO"
    queue_type: str = "classic"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `CARGOLINT_*` variables; raise SettingsError naming a bad one."""
        env = os.environ if environ is None else environ
        d = cls()

        def text(name: str, default: str) -> str:
            value = env.get(name, "").strip()
            return value or default

        def number(
            name: str, default: float, *, minimum: float = 0.0, integer: bool = False
        ) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw) if integer else float(raw)
            except ValueError:
                kind = "an integer" if integer else "a number"
                raise SettingsError(name, f"must be {kind}, got {raw!r}") from None
            if not value >= minimum:  # also rejects NaN
                raise SettingsError(name, f"must be at least {minimum}, got {raw!r}")
            return value

        def flag(name: str, default: bool) -> bool:
            raw = env.get(name, "").strip().lower()
            if not raw:
                return default
            if raw in {"1", "true", "yes", "on"}:
                return True
            if raw in {"0", "false", "no", "off"}:
                return False
            raise SettingsError(name, f"must be 0 or 1, got {raw!r}")

        def duration(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = parse_duration(raw)
            except ValueError as exc:
                raise SettingsError(name, str(exc)) from None
            if value <= 0:
                raise SettingsError(name, "must be longer than 0")
            return value

        def port(name: str, default: int) -> int:
            value = int(number(name, default, minimum=0, integer=True))
            if value > 65535:
                raise SettingsError(name, f"must be a TCP port (0-65535), got {value}")
            return value

        schedule = d.retry_schedule
        if raw := env.get("CARGOLINT_RETRY_SCHEDULE", "").strip():
            try:
                schedule = parse_schedule(raw)
            except ValueError as exc:
                raise SettingsError("CARGOLINT_RETRY_SCHEDULE", str(exc)) from None

        disable_after = duration("CARGOLINT_DISABLE_AFTER", d.disable_after)

        networks: list[IPNetwork] = []
        for part in env.get("CARGOLINT_ALLOWED_NETWORKS", "").split(","):
            if not part.strip():
                continue
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise SettingsError(
                    "CARGOLINT_ALLOWED_NETWORKS", f"{part.strip()!r} is not a CIDR network"
                ) from None

        ca_bundle: Path | None = None
        if raw := env.get("CARGOLINT_CA_BUNDLE", "").strip():
            ca_bundle = Path(raw)
            if not ca_bundle.is_file():
                raise SettingsError("CARGOLINT_CA_BUNDLE", f"{raw} is not a readable file")

        secret_keys = tuple(
            k.strip() for k in env.get("CARGOLINT_SECRET_KEY", "").split(",") if k.strip()
        )
        if secret_keys:
            from engine.core.crypto import validate_fernet_keys  # noqa: PLC0415

            try:
                validate_fernet_keys(secret_keys)
            except ValueError as exc:
                raise SettingsError("CARGOLINT_SECRET_KEY", str(exc)) from None

        database_url = text("CARGOLINT_DATABASE_URL", d.database_url)
        if not database_url.startswith(("postgres://", "postgresql://")):
            raise SettingsError("CARGOLINT_DATABASE_URL", "must be a postgresql:// URL")
        amqp_url = text("CARGOLINT_AMQP_URL", d.amqp_url)
        if not amqp_url.startswith(("amqp://", "amqps://")):
            raise SettingsError("CARGOLINT_AMQP_URL", "must be an amqp:// or amqps:// URL")

        timeout = number("CARGOLINT_DELIVERY_TIMEOUT", d.delivery_timeout)
        if timeout <= 0:
            raise SettingsError("CARGOLINT_DELIVERY_TIMEOUT", "must be greater than 0")
        rate = number("CARGOLINT_ENDPOINT_RATE", d.endpoint_rate)
        if rate <= 0:
            raise SettingsError("CARGOLINT_ENDPOINT_RATE", "must be greater than 0")

        retention = duration("CARGOLINT_RETENTION", d.retention)
        purge_share = number("CARGOLINT_PURGE_SHARE", d.purge_share)
        if not 0 < purge_share <= 1:
            raise SettingsError(
                "CARGOLINT_PURGE_SHARE", f"must be above 0 and at most 1, got {purge_share}"
            )

        dns_timeout = number("CARGOLINT_DNS_TIMEOUT", d.dns_timeout)
        if dns_timeout <= 0:
            raise SettingsError("CARGOLINT_DNS_TIMEOUT", "must be greater than 0")
        dns_servers = tuple(
            _dns_server(part.strip())
            for part in env.get("CARGOLINT_DNS_SERVERS", "").split(",")
            if part.strip()
        )

        log_level = text("CARGOLINT_LOG_LEVEL", d.log_level).upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError("CARGOLINT_LOG_LEVEL", "must be DEBUG, INFO, WARNING or ERROR")

        queue_type = text("CARGOLINT_QUEUE_TYPE", d.queue_type).lower()
        if queue_type not in QUEUE_TYPES:
            raise SettingsError(
                "CARGOLINT_QUEUE_TYPE", f"must be classic or quorum, got {queue_type!r}"
            )

        return cls(
            database_url=database_url,
            amqp_url=amqp_url,
            api_host=text("CARGOLINT_API_HOST", d.api_host),
            api_port=port("CARGOLINT_API_PORT", d.api_port),
            metrics_port=port("CARGOLINT_METRICS_PORT", d.metrics_port),
            delivery_timeout=timeout,
            retry_schedule=schedule,
            endpoint_rate=rate,
            endpoint_concurrency=int(
                number(
                    "CARGOLINT_ENDPOINT_CONCURRENCY",
                    d.endpoint_concurrency,
                    minimum=1,
                    integer=True,
                )
            ),
            allow_http=flag("CARGOLINT_ALLOW_HTTP", d.allow_http),
            allowed_networks=tuple(networks),
            ca_bundle=ca_bundle,
            secret_keys=secret_keys,
            shutdown_grace=number("CARGOLINT_SHUTDOWN_GRACE", d.shutdown_grace),
            retention=retention,
            purge_share=purge_share,
            disable_after=disable_after,
            max_in_flight=int(
                number("CARGOLINT_MAX_IN_FLIGHT", d.max_in_flight, minimum=1, integer=True)
            ),
            prefetch=int(number("CARGOLINT_PREFETCH", d.prefetch, minimum=1, integer=True)),
            poll_interval=number("CARGOLINT_POLL_INTERVAL", d.poll_interval, minimum=0.01),
            worker_lease=number("CARGOLINT_WORKER_LEASE", d.worker_lease, minimum=1.0),
            cache_reload_interval=number(
                "CARGOLINT_CACHE_RELOAD_INTERVAL", d.cache_reload_interval, minimum=1.0
            ),
            max_webhooks_per_account=int(
                number(
                    "CARGOLINT_MAX_WEBHOOKS_PER_ACCOUNT",
                    d.max_webhooks_per_account,
                    minimum=1,
                    integer=True,
                )
            ),
            api_rate_limit=number("CARGOLINT_API_RATE_LIMIT", d.api_rate_limit, minimum=0.1),
            api_rate_burst=int(
                number("CARGOLINT_API_RATE_BURST", d.api_rate_burst, minimum=1, integer=True)
            ),
            dns_timeout=dns_timeout,
            dns_servers=dns_servers,
            log_level=log_level,
            queue_type=queue_type,
        )


def _dns_server(entry: str) -> str:
    """`ip`, `ip:port` or `[ipv6]:port`, as c-ares takes them; SettingsError otherwise."""
    host, port = entry, "53"
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":") or port
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    try:
        ipaddress.ip_address(host)
        valid = 0 < int(port) <= 65535
    except ValueError:
        valid = False
    if not valid:
        raise SettingsError(
            "CARGOLINT_DNS_SERVERS", f"{entry!r} is not an IP address with an optional port"
        )
    return entry
