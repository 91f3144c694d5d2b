"""Generation (DESIGN.md §8): ``generate(model, input_ids, attention_mask=None, **options)`` --
greedy search, sampling and beam search over any decoder with the cache protocol
(``model.new_cache``, ``model(tokens, cache=..., attention_mask=...)``, ``cache.reorder``)."""
from .generate import generate

__all__ = ["generate"]
