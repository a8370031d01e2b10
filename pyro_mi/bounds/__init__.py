"""MI bounds, one module per family (Brekelmans et al. 2022)."""

from .importance import ba_bounds, iwae_bounds

__all__ = ["ba_bounds", "iwae_bounds"]
