"""fenghuo's benchmarks: ``python -m bench run SCENARIO`` (see bench/README.md)."""
