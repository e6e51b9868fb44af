"""Released answers: DP statistics, noisy argmax / top-k, and the one budget filter."""
