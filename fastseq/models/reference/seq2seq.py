"""torch.nn twins of fastseq.models.seq2seq: TorchTransformerSeq2Seq and TorchLSTMSeq2Seq, the same
models written as a PyTorch user writes them -- torch.nn.TransformerEncoderLayer /
TransformerDecoderLayer, torch.nn.LSTM and nn.LSTMCell, the attention spelled out step by step,
logits then F.cross_entropy -- with the same state_dict keys, so
`twin.load_state_dict(model.state_dict())` loads strictly.  Greedy decoding is written here on
its own (no code shared with fastseq's loop): the oracle of the models' decoding tests.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..seq2seq_lstm import LSTMSeq2SeqConfig
from ..seq2seq_transformer import TransformerSeq2SeqConfig, activation_fn
from ._loss import token_cross_entropy


class _Seq2Seq(nn.Module):
    def forward(self, src, src_lengths, tgt_in):
        return self.output(self.decode(tgt_in, self.encode(src, src_lengths)))   # (B, T, V)

    def output(self, h):
        W = self.decoder_embed.weight if self.output_proj is None else self.output_proj.weight
        return F.linear(h, W)

    def loss(self, batch, label_smoothing=0.0, smoothing="torch"):
        logits = self(batch["src"], batch["src_lengths"], batch["tgt_in"])
        return token_cross_entropy(logits, batch["tgt_out"], label_smoothing, smoothing)       # (B, T, V) vs (B, T)

    def _embeddings(self, c):
        self.encoder_embed = nn.Embedding(c.vocab_size, c.dim, padding_idx=c.pad_id)
        self.decoder_embed = self.encoder_embed if c.share_embeddings else \
            nn.Embedding(c.vocab_size, c.dim, padding_idx=c.pad_id)

    def _finish(self, generated):
        """generated: list of (B,) argmax tokens; pad after each row's first eos."""
        c = self.config
        out = torch.stack(generated, 1)                                       # (B, L)
        ended = (out == c.eos_id).long().cumsum(1)                            # (B, L)
        after = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], 1) > 0
        return out.masked_fill(after, c.pad_id)


class TorchTransformerSeq2Seq(_Seq2Seq):
    def __init__(self, config: TransformerSeq2SeqConfig):
        super().__init__()
        c = self.config = config
        self._embeddings(c)
        kw = dict(d_model=c.dim, nhead=c.heads, dim_feedforward=c.ffn_dim, dropout=c.dropout,
                  layer_norm_eps=c.layer_norm_eps, batch_first=True, norm_first=c.norm_first)
        self.encoder_layers = nn.ModuleList(nn.TransformerEncoderLayer(activation=activation_fn(c.activation), **kw)
                                            for _ in range(c.encoder_layers))
        self.decoder_layers = nn.ModuleList(nn.TransformerDecoderLayer(activation=activation_fn(c.activation), **kw)
                                            for _ in range(c.decoder_layers))
        self.encoder_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps) if c.norm_first else None
        self.decoder_norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps) if c.norm_first else None
        self.output_proj = None if c.tie_weights else nn.Linear(c.dim, c.vocab_size, bias=False)
        # the positional encoding of the PyTorch tutorial
        position = torch.arange(c.max_positions, dtype=torch.float64).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, c.dim, 2, dtype=torch.float64) * (-math.log(10000.0) / c.dim))
        pe = torch.zeros(c.max_positions, c.dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.to(torch.get_default_dtype()), persistent=False)
        self.drop = nn.Dropout(c.dropout)

    def embed(self, table, tokens):
        return self.drop(table(tokens) * math.sqrt(self.config.dim) + self.pe[:tokens.shape[1]])

    def encode(self, src, src_lengths):
        pad = torch.arange(src.shape[1], device=src.device).unsqueeze(0) >= src_lengths.unsqueeze(1)
        x = self.embed(self.encoder_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, src_key_padding_mask=pad)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return x, pad

    def decode(self, tgt_in, memory):
        enc, pad = memory
        T = tgt_in.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=tgt_in.device), diagonal=1)     # True = masked
        x = self.embed(self.decoder_embed, tgt_in)
        for layer in self.decoder_layers:
            x = layer(x, enc, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return x

    @torch.no_grad()
    def greedy_decode(self, src, src_lengths, max_len):
        """Re-run the whole model on the growing prefix; stop when every row has produced eos."""
        c = self.config
        ys = torch.full((src.shape[0], 1), c.bos_id, dtype=torch.long, device=src.device)
        generated = []
        for _ in range(max_len):
            nxt = self(src, src_lengths, ys)[:, -1].argmax(-1)
            generated.append(nxt)
            ys = torch.cat([ys, nxt.unsqueeze(1)], 1)
            if bool((torch.stack(generated, 1) == c.eos_id).any(1).all()):
                break
        return self._finish(generated)


class TorchLSTMSeq2Seq(_Seq2Seq):
    def __init__(self, config: LSTMSeq2SeqConfig):
        super().__init__()
        c = self.config = config
        E, H = c.dim, c.hidden
        self._embeddings(c)
        self.encoder = nn.LSTM(E, H // 2, c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0,
                               bidirectional=True)
        self.decoder_cells = nn.ModuleList(nn.LSTMCell(2 * E if i == 0 else H, H) for i in range(c.layers))
        self.attention_proj = nn.Linear(H, H, bias=False)
        self.attention_out = nn.Linear(2 * H, E, bias=False)
        self.output_proj = None if c.tie_weights else nn.Linear(E, c.vocab_size, bias=False)
        self.drop = nn.Dropout(c.dropout)

    def encode(self, src, src_lengths):
        c = self.config
        x = self.drop(self.encoder_embed(src))
        packed = nn.utils.rnn.pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h, cell) = self.encoder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        out = self.drop(out)
        pad = torch.arange(src.shape[1], device=src.device).unsqueeze(0) >= src_lengths.unsqueeze(1)

        def combine(s):                 # fairseq's combine_bidir: [forward; backward] per layer
            s = s.view(c.layers, 2, s.shape[1], -1).transpose(1, 2)
            return [s[i].reshape(s.shape[1], -1) for i in range(c.layers)]
        return out, pad, combine(h), combine(cell)

    def step(self, y, feed, hs, cs, memory):
        out, pad = memory[:2]
        x = torch.cat([y, feed], dim=1)
        for i, cell in enumerate(self.decoder_cells):
            hs[i], cs[i] = cell(x, (hs[i], cs[i]))
            x = self.drop(hs[i]) if i + 1 < len(self.decoder_cells) else hs[i]
        q = self.attention_proj(x)                                              # (B, H)
        scores = torch.bmm(out, q.unsqueeze(2)).squeeze(2)                      # (B, S)
        attn = F.softmax(scores.masked_fill(pad, float("-inf")), dim=-1)
        context = torch.bmm(attn.unsqueeze(1), out).squeeze(1)                  # (B, H)
        return self.drop(torch.tanh(self.attention_out(torch.cat([context, x], dim=1))))

    def decode(self, tgt_in, memory):
        y = self.drop(self.decoder_embed(tgt_in))
        hs, cs = list(memory[2]), list(memory[3])
        feed = y.new_zeros(y.shape[0], self.config.dim)
        outs = []
        for t in range(y.shape[1]):
            feed = self.step(y[:, t], feed, hs, cs, memory)
            outs.append(feed)
        return torch.stack(outs, dim=1)

    @torch.no_grad()
    def greedy_decode(self, src, src_lengths, max_len):
        c = self.config
        memory = self.encode(src, src_lengths)
        hs, cs = list(memory[2]), list(memory[3])
        feed = memory[0].new_zeros(src.shape[0], c.dim)
        prev = torch.full((src.shape[0],), c.bos_id, dtype=torch.long, device=src.device)
        generated = []
        for _ in range(max_len):
            feed = self.step(self.decoder_embed(prev), feed, hs, cs, memory)
            prev = self.output(feed).argmax(-1)
            generated.append(prev)
            if bool((torch.stack(generated, 1) == c.eos_id).any(1).all()):
                break
        return self._finish(generated)
