"""Weights in and out of a run: conversion to and from PyTorch/MONAI, `init_from` transfer, export.

Imports run plumbing (checkpoints, atomic writes), models and data; never the trainers or entry points.
"""
