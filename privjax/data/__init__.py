"""Recommendation datasets: built-in synthetic data, MovieLens raw files, TFDS."""
