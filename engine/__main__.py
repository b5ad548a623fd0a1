"""`python -m engine` is the same as the `cargolint-webhooks` command."""

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
