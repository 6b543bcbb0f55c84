"""Load generator and benchmarks for promptswap: ``python -m bench.run [--quick]``."""
