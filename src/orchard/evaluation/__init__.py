"""Evaluation: metrics of a model on data, and the reports that show them."""
