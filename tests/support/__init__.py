"""The kit the tests and the benchmarks share: mounts (``harness``), durability trials."""
