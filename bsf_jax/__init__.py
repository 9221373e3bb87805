"""bsf_jax: BrainSegFounder in JAX/Flax.

Importing the package has no side effects; see README.md for the entry points.
"""

__version__ = "0.1.0"
