"""The one place an HTTP delivery attempt is made, for the worker and the API's test endpoint."""

from engine.delivery.http import Outcome, Sender

__all__ = ["Outcome", "Sender"]
