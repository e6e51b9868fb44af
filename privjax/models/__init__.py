"""NNX models. Models never import DP modules; DP transforms see plain pytrees."""
