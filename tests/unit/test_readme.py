"""The README shows receivers the same verification code the tests run."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python_blocks(markdown: str) -> list[str]:
    blocks = markdown.split("```python\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


def test_the_readme_carries_the_rotation_snippet_the_tests_run() -> None:
    # tests/worker/test_rotation.py runs docs/receiver_rotation_snippet.py as written.
    snippet = (ROOT / "docs" / "receiver_rotation_snippet.py").read_text()
    assert snippet in _python_blocks((ROOT / "README.md").read_text())


def test_the_readme_carries_the_public_docs_snippet_unchanged() -> None:
    documented = (
        "expected = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()\n"
        "hmac.compare_digest(expected, signature.split('=')[1])\n"
    )
    assert documented in _python_blocks((ROOT / "README.md").read_text())
