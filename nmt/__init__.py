"""nmt: attention-based RNN encoder-decoders for neural machine translation."""

__version__ = "0.1.0"
