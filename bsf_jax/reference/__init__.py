"""Reference implementations (PyTorch/MONAI and NumPy) that tests and benchmarks compare against.

Nothing in the training path imports this package; torch and monai are imported
lazily inside the modules that need them (the optional `torch` extra).
"""
