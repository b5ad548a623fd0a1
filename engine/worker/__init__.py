"""The delivery engine: consume → match → record → dispatch → retry."""
