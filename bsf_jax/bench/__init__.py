"""Benchmarks: `python -m bsf_jax.bench {data,ssl,infer,scale} [flags]`.

Each benchmark measures bsf_jax and its reference (MONAI/PyTorch) in the same
run and prints the ratio, because these machines are too noisy for numbers
taken in separate runs to be compared.
"""
