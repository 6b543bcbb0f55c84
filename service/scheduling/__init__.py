"""The batch queue that forms batches from concurrent requests, and its errors (no torch)."""
