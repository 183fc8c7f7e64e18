"""gapcallback: watch why a model generalizes, geometrically, while it trains."""

__version__ = "0.1.0"
