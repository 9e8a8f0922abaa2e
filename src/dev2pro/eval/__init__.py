"""Evaluation: the trained-on x applied-to comparison experiment (`compare` runs it from its `plan`, through the
`toolkit` and `judges`, to `stats`, `results`, the `verdict`, `tables`, `plots` and the `report`) and the toy-world
demo (`demo`). The top layer: it runs the training recipes and the sampler."""
