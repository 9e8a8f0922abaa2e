"""dev2pro: train FLUX.1 LoRAs that don't break.

The recipe: de-distill FLUX.1-dev into a guidance-1.0 base ("dev2pro"), store it in fp8, train LoRAs on it at
guidance 1.0, and apply them to dev at inference. Importing this package has no side effects.
"""

__version__ = "0.1.0"
