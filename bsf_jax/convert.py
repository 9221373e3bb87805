"""`python -m bsf_jax.convert`: PyTorch/MONAI/BrainSegFounder weights <-> bsf_jax.

The conversion and its command line live in `bsf_jax.weights.convert`; run
`python -m bsf_jax.convert --help` for the flags.
"""

from bsf_jax.weights.convert import main

if __name__ == "__main__":
  main()
