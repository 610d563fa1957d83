"""Evaluation: end-of-training metrics, FID, the evaluation jobs and reports."""
