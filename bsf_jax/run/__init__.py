"""Run plumbing: config, kinds of run, checkpoints and read-only checkpoint reads, the workdir lock,
hosts, preflight, metric writers.

Imports the step, inference and scores, models and data; never the trainers, weights or entry points.
"""
