"""Analysis of explanations: perturbation analysis (AOPC) and the comparison of two models."""
