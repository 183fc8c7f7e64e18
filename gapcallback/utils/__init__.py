"""Internal helpers shared by the functional, metric and callback layers (not public API)."""
