"""Inference and scores: the checkpoint contract, sliding-window inference, metrics and challenge scoring.

Imports models and data only.
"""
