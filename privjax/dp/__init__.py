"""DP-SGD primitives: clipping, ghost norms, noise, sampling, accounting; the step and its plan."""
