"""The standard sequence models, built only from fastseq.nn and fastseq.functional (DESIGN.md §1, §8).

One file per architecture: gpt, seq2seq (Transformer and LSTM encoder-decoders), bert, elmo,
rnn_lm.  Each file reads like a short paper -- config, blocks bottom-up, the model, its forward --
and holds, in this order:

- ``<Name>Config``: a dataclass of the architecture's sizes and recipe (dropout, tying, norm
  placement); ``__post_init__`` rejects a bad value with a ValueError naming the field and the
  value received.
- ``<Name>(config)``: an nn.Module.  Only fastseq.nn modules and fastseq.functional ops do the
  work (torch.nn.Embedding, torch.nn.Linear, nn.Parameter and plain tensor arithmetic where
  fastseq has no counterpart).  ``forward(...)`` returns logits (shapes in its docstring).
  ``loss(batch, label_smoothing=0.0, smoothing="torch")`` returns the training objective, the
  mean cross-entropy per target token, with the output layer fused into the loss through
  ``fastseq.functional.linear_cross_entropy`` so the (tokens, V) logits are never formed.
  ``batch`` is a dict of tensors whose keys the file documents.
- ``example_batch(config, B, T, generator=None, device="cpu") -> dict``: a random batch of the
  documented form (benchmarks and tests).

Its torch.nn twin lives in ``fastseq.models.reference.<file>`` as ``Torch<Name>(config)``: the
same model written the way a PyTorch user writes it (torch.nn modules, torch.nn.functional,
logits then F.cross_entropy), with the same state_dict keys and shapes -- so
``twin.load_state_dict(model.state_dict())`` loads strictly -- and the same forward / loss
signatures.  It is the oracle of the model's tests (loss and every gradient at dropout 0) and the
peer of its benchmark (``fastseq-bench --only models``).
"""
from .bert import BERT, BERTConfig, mask_tokens
from .elmo import ELMo, ELMoConfig, ScalarMix
from .gpt import GPT, GPTConfig
from .rnn_lm import RNNLM, RNNLMConfig
from .seq2seq import LSTMSeq2Seq, LSTMSeq2SeqConfig, TransformerSeq2Seq, TransformerSeq2SeqConfig

__all__ = ["GPT", "GPTConfig", "BERT", "BERTConfig", "mask_tokens", "TransformerSeq2Seq", "TransformerSeq2SeqConfig",
           "LSTMSeq2Seq", "LSTMSeq2SeqConfig", "ELMo", "ELMoConfig", "ScalarMix", "RNNLM", "RNNLMConfig"]
