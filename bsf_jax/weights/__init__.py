"""Weights in and out of a run: the name table to and from PyTorch/MONAI, weight files,
`init_from` transfer, export, and finished runs' checkpoints at work: ensembles, prediction
of new subjects, evaluation.

Imports run plumbing (checkpoint reads), inference, models and data; never the trainers or
entry points.
"""
