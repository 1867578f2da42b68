"""Interpret features: statistics and examples from one pass over text, weight tables, the
on-disk feature store, labels, explanations and their scores."""
