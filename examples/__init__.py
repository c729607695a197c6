"""Runnable examples of identity-service in use (examples/checkout: the two-site demo)."""
