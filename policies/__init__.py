"""Shipped policy files (data only)."""
