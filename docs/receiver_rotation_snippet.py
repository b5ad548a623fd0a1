import hashlib
import hmac
from collections.abc import Mapping


def verify(secret: str, payload: str, headers: Mapping[str, str]) -> bool:
    """True if the request is signed with `secret`, the one you hold, before, during or after
    a secret rotation: during its overlap X-CargoLint-Signature carries the previous secret's
    signature and X-CargoLint-Signature-Next the new one's."""
    expected = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
    for name in ("X-CargoLint-Signature", "X-CargoLint-Signature-Next"):
        signature = headers.get(name, "")
        if hmac.compare_digest(expected, signature.partition("=")[2]):
            return True
    return False
