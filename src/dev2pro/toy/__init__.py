"""The toy world: generator, toy autoencoder and text encoder, judge, and the shipped toy models."""
