"""Training methods: each adds its batches and its loss to the shared engine, one module each."""
