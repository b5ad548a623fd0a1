"""CargoLint Webhooks: document events from RabbitMQ to signed, retried HTTPS webhooks."""

__all__ = ["__version__"]

__version__ = "0.1.0"
