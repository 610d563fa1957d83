"""Tracking: the tracker interface, MLflow and the model registry."""
