"""Trainers, chosen by `config.trainer`: each exposes `train_and_evaluate`, and the
pretraining and fine-tuning trainers the `make_job` it hands to `loop.run`."""
