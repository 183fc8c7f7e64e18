"""Optimizers for validation-free generalization control."""

from gapcallback.optim.population_risk_adamw import PopulationRiskAdamW, resolve_alpha

__all__ = ["PopulationRiskAdamW", "resolve_alpha"]
