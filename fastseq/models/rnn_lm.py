"""RNNLM: a recurrent language model, the shape of pytorch/examples' word_language_model.

Zaremba et al. 2014 ("Recurrent Neural Network Regularization"): a token embedding, a stack of
recurrent layers with dropout between them, and a linear output layer, with the output layer
tied to the embedding (Press & Wolf 2017, Inan et al. 2017; the example's --tied):

    x      = dropout(Emb[tokens])                 (B, T, E)
    h      = RNN_L(... RNN_1(x))                  (B, T, H)   dropout between the layers
    logits = dropout(h) W^T + b                   (B, T, V)   W = Emb (then H = E) when tied

cell: "lstm" and "gru" (torch.nn.LSTM / GRU's equations), "layer_norm_lstm" and
"layer_norm_gru" (layer normalization on the gate pre-activations and, for the LSTM, on the
cell: Ba et al. 2016; fastseq.nn.LayerNormLSTM / LayerNormGRU).  Initialization as the example:
embedding and output weight uniform(-0.1, 0.1), output bias 0; the recurrent layers keep
torch's default (uniform(+-1/sqrt(H)); norm gains 1, shifts 0).

On fastseq's ops the whole recurrent stack is one fastseq.nn module (fused whole-sequence
layers), run time-major: the embedding is looked up for tokens.t(), so the (T, B, E) input, the
(T, B, H) output and the (T B, H) rows the loss reads are all contiguous with no transposing
copy; the output layer is fused into the loss (fastseq.functional.linear_cross_entropy), so
loss() never forms the (B T, V) logits.

State_dict keys (the example's names):
    encoder.weight (V, E)
    rnn.weight_ih_l{k} (G H, E or H), rnn.weight_hh_l{k} (G H, H), rnn.bias_ih_l{k}, rnn.bias_hh_l{k} (G H,)
        (G = 4 for the LSTMs, 3 for the GRUs) and, for the layer-normalized cells,
        rnn.norm_ih_weight_l{k}, rnn.norm_hh_weight_l{k} (G H,), rnn.norm_c_weight_l{k}, rnn.norm_c_bias_l{k} (H,)
    decoder.weight (V, H) (the same tensor as encoder.weight when tied), decoder.bias (V,)

State: the recurrent stack's, as torch.nn.LSTM / GRU return it: (h, c), each (L, B, H), for
the LSTMs; h (L, B, H) for the GRUs.

batch (loss): {"tokens": (B, T) int64, "targets": (B, T) int64 (-100 where no loss is taken),
optional "state": the state to start from (truncated backpropagation through time: the previous
batch's final state, detached); absent, the state starts at zero}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .. import functional as FF
from .. import nn as fnn
from ..generation.cache import RecurrentCache

CELLS = {"lstm": fnn.LSTM, "gru": fnn.GRU, "layer_norm_lstm": fnn.LayerNormLSTM, "layer_norm_gru": fnn.LayerNormGRU}


@dataclass
class RNNLMConfig:
    vocab_size: int = 256                 # V
    dim: int = 200                        # E: the embedding
    hidden: int = 200                     # H: each recurrent layer's state
    layers: int = 2                       # L
    cell: str = "lstm"                    # one of CELLS
    dropout: float = 0.2                  # on the embedding, between the layers, on the output
    tie_weights: bool = True              # output weight = embedding (needs hidden == dim)
    layer_norm_eps: float = 1e-5          # the layer-normalized cells' eps

    def __post_init__(self):
        for name in ("vocab_size", "dim", "hidden", "layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"RNNLMConfig.{name} must be a positive int, got {v!r}")
        if self.cell not in CELLS:
            raise ValueError(f"RNNLMConfig.cell must be one of {tuple(CELLS)}, got {self.cell!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RNNLMConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.tie_weights and self.hidden != self.dim:
            raise ValueError(f"RNNLMConfig.tie_weights needs hidden == dim, got hidden={self.hidden}, dim={self.dim}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"RNNLMConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def has_cell_state(self) -> bool:
        """The state is (h, c) (the LSTMs) rather than h."""
        return self.cell.endswith("lstm")


class RNNLM(nn.Module):
    """Recurrent language model.  forward(tokens (B, T), state=None, return_state=False) ->
    logits (B, T, V) [, state]; loss(batch) -> the mean next-token cross-entropy, the output layer
    fused into the loss."""

    def __init__(self, config: RNNLMConfig):
        super().__init__()
        if not isinstance(config, RNNLMConfig):
            raise TypeError(f"RNNLM(config): expected an RNNLMConfig, got {type(config).__name__}")
        c = self.config = config
        self.encoder = nn.Embedding(c.vocab_size, c.dim)
        eps = dict(eps=c.layer_norm_eps) if c.cell.startswith("layer_norm") else {}
        self.rnn = CELLS[c.cell](c.dim, c.hidden, num_layers=c.layers, dropout=c.dropout if c.layers > 1 else 0.0,
                                 **eps)                       # time-major: (T, B, E) -> (T, B, H)
        self.decoder = nn.Linear(c.hidden, c.vocab_size)
        if c.tie_weights:
            self.decoder.weight = self.encoder.weight
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def hidden(self, tokens: Tensor, state=None):
        """The last layer's outputs, after the output dropout, time-major (T, B, H), and the final state."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"RNNLM: tokens must be a (B, T) tensor, got shape {tuple(getattr(tokens, 'shape', ()))}")
        p, training = self.config.dropout, self.training
        x = FF.dropout(self.encoder(tokens.t()), p, training)                  # (T, B, E)
        y, state = self.rnn(x, state)                                           # (T, B, H)
        return FF.dropout(y, p, training), state

    def forward(self, tokens: Tensor, state=None, return_state: bool = False, cache: Optional[RecurrentCache] = None,
                attention_mask: Optional[Tensor] = None):
        """The next-token logits of every position.

        Args:
            tokens: int64 ids.
            state: the stack's initial state ((h, c) for LSTM cells, h for GRU cells), None = 0.
            return_state: also return the final state.
            cache: None, or a RecurrentCache from new_cache: tokens continue its state, which is
                updated in place (DESIGN §8); state is then ignored.
            attention_mask: with a cache, None or all ones (a recurrent layer would read left
                padding as input: decode prompts of one length together).
        Returns:
            logits; (logits, state) with return_state; (logits, cache) with a cache.
        Shapes:
            tokens (B, T); logits (B, T, V); state tensors (layers, B, H).
        """
        if cache is not None:
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("RNNLM: left padding (zeros in attention_mask) is not supported: the recurrent "
                                 "state would read the pads; decode prompts of one length together")
            cache.check_room(tokens.shape[1] if isinstance(tokens, Tensor) and tokens.dim() == 2 else 0)
            state = cache.state
        y, state = self.hidden(tokens, state)
        logits = torch.nn.functional.linear(y.transpose(0, 1), self.decoder.weight, self.decoder.bias)   # (B, T, V)
        if cache is not None:
            cache.update(state, tokens.shape[1])
            return logits, cache
        return (logits, state) if return_state else logits

    def new_cache(self, batch_size: int, max_length: Optional[int] = None) -> RecurrentCache:
        """An empty RecurrentCache (the layers start from zeros)."""
        return RecurrentCache(batch_size, max_length)

    def loss(self, batch: Dict[str, Tensor], label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        """Mean cross-entropy over the targets that are not -100 (the logits never formed)."""
        if not isinstance(batch, dict) or "tokens" not in batch or "targets" not in batch:
            raise ValueError(f"RNNLM.loss: expected a dict with 'tokens' and 'targets', got "
                             f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        tokens, targets = batch["tokens"], batch["targets"]
        if targets.shape != tokens.shape:
            raise ValueError(f"RNNLM.loss: targets must have the tokens' shape {tuple(tokens.shape)}, "
                             f"got {tuple(targets.shape)}")
        y, _ = self.hidden(tokens, batch.get("state"))
        return FF.linear_cross_entropy(y.view(-1, y.shape[-1]), self.decoder.weight,
                                       targets.t().reshape(-1),                 # (T B,): y's row order
                                       linear_bias=self.decoder.bias, ignore_index=-100,
                                       label_smoothing=label_smoothing, smoothing=smoothing)


def example_batch(config: RNNLMConfig, B: int, T: int, generator: Optional[torch.Generator] = None,
                  device="cpu") -> Dict[str, Tensor]:
    """Random tokens (B, T) and their next-token targets (B, T): two tensors with their own
    storage (not views of one sequence, so writing -100 into the targets leaves the tokens alone)."""
    seq = torch.randint(0, config.vocab_size, (B, T + 1), generator=generator)
    return {"tokens": seq[:, :-1].clone().to(device), "targets": seq[:, 1:].clone().to(device)}
