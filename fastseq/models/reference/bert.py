"""TorchBERT: fastseq.models.bert.BERT written the way a PyTorch user writes it.

torch.nn.Embedding / LayerNorm / Dropout / TransformerEncoderLayer (post-norm, erf GELU,
batch_first), the MLM head tied to the token embedding, logits for the chosen rows then
F.cross_entropy.  Same state_dict keys and shapes as BERT, so
``twin.load_state_dict(model.state_dict())`` loads strictly.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bert import BERTConfig
from ._loss import token_cross_entropy


class TorchEmbeddings(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_id)
        self.position = nn.Embedding(config.max_positions, config.dim)
        self.segment = nn.Embedding(config.type_vocab_size, config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tokens: Tensor, segments: Optional[Tensor] = None) -> Tensor:
        T = tokens.shape[1]
        if segments is None:
            segments = torch.zeros_like(tokens)
        positions = torch.arange(T, device=tokens.device)
        x = self.token(tokens) + self.position(positions) + self.segment(segments)     # (B, T, E)
        return self.dropout(self.norm(x))


class TorchMLMHead(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim)
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        return F.linear(self.norm(F.gelu(self.dense(x))), embedding, self.bias)       # (*, V)


class TorchBERT(nn.Module):
    def __init__(self, config: BERTConfig):
        super().__init__()
        self.config = config
        self.embeddings = TorchEmbeddings(config)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(config.dim, config.heads, config.ffn_dim, config.dropout, activation="gelu",
                                       layer_norm_eps=config.layer_norm_eps, batch_first=True, norm_first=False)
            for _ in range(config.layers))
        self.head = TorchMLMHead(config)
        self._init(config.init_std)

    def _init(self, std: float) -> None:
        """normal(0, std) for every matrix (embeddings, projections), the pad row zero; biases and
        norms keep torch's defaults (the tests load the model's weights anyway)."""
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
        with torch.no_grad():
            self.embeddings.token.weight[self.config.pad_id].zero_()

    def encode(self, tokens: Tensor, segments: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Tensor:
        T = tokens.shape[1]
        pad = None
        if lengths is not None:
            pad = torch.arange(T, device=tokens.device)[None, :] >= lengths.to(tokens.device)[:, None]   # (B, T)
        x = self.embeddings(tokens, segments)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return x

    def forward(self, tokens: Tensor, segments: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Tensor:
        return self.head(self.encode(tokens, segments, lengths), self.embeddings.token.weight)   # (B, T, V)

    def loss(self, batch: dict, label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        tokens, targets = batch["tokens"], batch["targets"]
        h = self.encode(tokens, batch.get("segments"), batch.get("lengths"))
        chosen = targets != -100
        logits = self.head(h[chosen], self.embeddings.token.weight)                   # (N, V)
        return token_cross_entropy(logits, targets[chosen], label_smoothing, smoothing)
