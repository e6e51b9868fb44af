"""Deployment compression: magnitude pruning and int8 quantization (no data touched)."""
