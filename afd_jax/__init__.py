"""afd_jax: Attention-based Feature Distillation (AAAI 2021) in JAX/Flax."""
__version__ = '0.1.0'
