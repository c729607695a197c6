"""identity-service: carries a visitor's identity across domains with one-time handoff tokens."""

__version__ = "0.4.0"
