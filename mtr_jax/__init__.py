"""mtr_jax: Model-as-Tools Reasoning in JAX."""

__version__ = "0.1.0"
