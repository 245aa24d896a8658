"""nmt: attention-based RNN encoder-decoders for neural machine translation."""

import os

# oneDNN (torch's CPU backend for bf16 matrix products) caches a compiled primitive for every
# matrix shape it sees, and token batches come in many shapes: with its default capacity (1024)
# the training process keeps growing; ideep, the layer between torch and oneDNN, keeps a cache of
# the same kind (LRU_CACHE_CAPACITY). Capped at 8 entries, bf16 training stays at the memory of
# fp32 at the same speed (figures in bench/README.md). Set before torch is imported; a value in
# the environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
os.environ.setdefault("LRU_CACHE_CAPACITY", "8")

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any  # noqa: E402  (after the environment above, on purpose)

from nmt.results import Candidate, Translation, WordAttention  # noqa: E402  (no torch in it)

if TYPE_CHECKING:
    from nmt.translate import Translator

__all__ = ["Candidate", "Translation", "Translator", "WordAttention", "__version__"]


def __getattr__(name: str) -> Any:
    """`from nmt import Translator` imports torch only then: `import nmt` (and `nmt --help`) stays
    quick, and the oneDNN settings above are in place before torch reads them."""
    if name == "Translator":
        from nmt.translate import Translator

        return Translator
    raise AttributeError(f"module 'nmt' has no attribute {name!r}")
