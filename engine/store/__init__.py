"""Postgres access with asyncpg: migrations and one module per table family."""
