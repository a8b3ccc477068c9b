"""The models' feature taps (defined in afd_jax/taps.py, which knows no models, so that
`distill/` can use them without importing the model zoo)."""
from afd_jax.taps import Tap, stage_final

__all__ = ['Tap', 'stage_final']
