"""Run plumbing: config, checkpoints, the workdir lock, atomic writes, hosts, preflight, metric writers.

Imports the step, inference and scores, models and data; never the trainers, weights or entry points.
"""
