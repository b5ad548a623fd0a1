"""The benchmark harness: how close the worker gets to this machine's limit.

Run it with `python -m bench` (or `cargolint-webhooks bench`); `--quick` for CI. Every part is
real: the machine's RabbitMQ and Postgres (a fresh vhost and database per run), the engine's
own worker process, and a fast HTTPS receiver in its own process.
"""

__all__: list[str] = []
