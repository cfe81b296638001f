"""Distillation: student initialisation, teacher data, logit cache, losses, training, evaluation."""
