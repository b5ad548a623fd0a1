"""The management API (CONTRACT §1): an aiohttp server in front of `engine.store`."""
