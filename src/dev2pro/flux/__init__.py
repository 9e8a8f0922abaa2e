"""The FLUX.1 model family and its files: presets, key tables, checkpoint reading/writing/conversion, fp8 storage and
compute, the autoencoder and text-encoder components, flow-matching math and the sampler.

Lowest layer: it knows nothing of LoRA, training or the toy world. Named stand-in components (the toy world's) plug in
through `dev2pro.flux.providers`, never through an import of `dev2pro.toy` here.
"""
