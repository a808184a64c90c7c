"""Locust load tests of a fenghuo relay: ``python -m loadtest`` (see loadtest/README.md)."""
