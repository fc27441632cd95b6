"""Data: corpus readers, token caches, packing, and the built-in synthetic world."""
