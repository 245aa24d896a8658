"""nmt: attention-based RNN encoder-decoders for neural machine translation."""

import os

# oneDNN (torch's CPU backend for bf16 matrix products) caches a compiled primitive for every
# matrix shape it sees, and token batches come in many shapes: with its default capacity (1024)
# the training process grew from 1.6 to 2.3 GB over 100 batches here, with 8 it stays at 1.6 GB
# at the same speed. Set before torch is imported; a value in the environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")

__version__ = "0.1.0"
