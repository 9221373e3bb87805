"""Trainers, chosen by `config.trainer`: each exposes `train_and_evaluate`."""
