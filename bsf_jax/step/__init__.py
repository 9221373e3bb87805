"""The training step: state, sharding, optimizer, losses, SSL views, fine-tuning
augmentation and the SSL step.

Imports models only; never run plumbing, trainers or entry points.
"""
