"""The management API (docs/contract.md §1): an aiohttp server in front of `engine.store`."""
