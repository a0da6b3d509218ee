"""Evaluation: the question corpus and how answers are scored."""
