"""Evaluation: the trained-on x applied-to comparison experiment (`compare`) and the toy-world demo (`demo`). The top
layer: it runs the training recipes and the sampler."""
