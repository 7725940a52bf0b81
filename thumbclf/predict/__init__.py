"""Prediction: ensembles, inference engines and their quality gate, executors (local, Ray), DDP."""
