"""Distillation pipeline library: config, data, soft labels, models, losses, training, evaluation."""
