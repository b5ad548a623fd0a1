"""The pure core: no I/O, no asyncio. Everything here is table-tested."""
