"""Load-test benchmarks for embserve."""
