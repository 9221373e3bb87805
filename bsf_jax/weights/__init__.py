"""Weights in and out of a run: the name table to and from PyTorch/MONAI, weight files,
`init_from` transfer, export, ensembles.

Imports run plumbing (checkpoints, atomic writes), models and data; never the trainers or entry points.
"""
