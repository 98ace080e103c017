"""edgebuild: mobile model bundles that fit their budgets, built from a manifest."""

__version__ = "0.1.0"
