"""Unit tests of the customer-behavior example (run: pytest -q tests)."""
