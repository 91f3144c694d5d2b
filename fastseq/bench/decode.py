"""Benchmark cases of a decoding loop (issue #8): a small GPT-style model decoded token by token
with a preallocated KV cache, the same loop run on torch's ops and on fastseq's.

The model is GPT-2's block written out with functional ops (6 pre-norm layers, E = 512, 8 heads,
vocab 8192, tanh-GELU, tied head, random weights): per layer two layer norms, one attention over
the cache slice, four GEMMs.  The loop prefills a 32-token prompt in one causal pass, then
decodes greedily; per step every op is called once per layer, so at batch 1 the time is the
GEMMs' weight reads (~94 MB of fp32 weights: bytes below) plus ~20 calls' per-call cost.  The
two loops differ only in `layer_norm` and `scaled_dot_product_attention` (fastseq's or torch's);
both produce the same tokens (checked once in setup).  Reported: ms per generation; tokens/s =
B * new tokens / time.

The second half (issue #12): fastseq.generate on the same shape of model against Hugging Face's
generate, CTranslate2 and a plain torch loop (peers.py), greedy, beam 4 and top-k 50 -- the
"generation" benchmarks (registry.ALIASES: the family "generation" is this one); then the
encoder-decoder models: beam-4 translation with fastseq.models.TransformerSeq2Seq against
CTranslate2's Translator, and greedy generation with fastseq.models.LSTMSeq2Seq against a
torch.nn.LSTMCell loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as FF
from . import peers
from .registry import Case, Setup, Skipped, register

LAYERS, E, NH, V, CTX = 6, 512, 8, 8192, 256
PROMPT = 32


class TinyGPT:
    """GPT-2's decoder with functional ops and a preallocated (L, B, NH, CTX, D) KV cache."""

    def __init__(self, device, seed=0):
        g = torch.Generator().manual_seed(seed)

        def p(*shape, std=0.02):
            return (torch.randn(*shape, generator=g) * std).to(device)

        self.wte, self.wpe = p(V, E), p(CTX, E, std=0.01)
        self.layers = [dict(ln1=(1 + p(E), p(E)), qkv=(p(3 * E, E), p(3 * E)), proj=(p(E, E), p(E)),
                            ln2=(1 + p(E), p(E)), fc=(p(4 * E, E), p(4 * E)), out=(p(E, 4 * E), p(E)))
                       for _ in range(LAYERS)]
        self.lnf = (1 + p(E), p(E))
        self.device = device

    def forward(self, tokens, pos, cache, ln, sdpa):
        """tokens (B, T) at positions pos..pos+T-1 -> logits of the last position (B, V); writes
        the T new keys/values into the cache and attends over cache[..., :pos + T]."""
        B, T = tokens.shape
        D = E // NH
        x = self.wte[tokens] + self.wpe[pos:pos + T]                        # (B, T, E)
        for i, L in enumerate(self.layers):
            h = ln(x, (E,), *L["ln1"])
            q, k, v = F.linear(h, *L["qkv"]).view(B, T, 3, NH, D).permute(2, 0, 3, 1, 4)   # 3 x (B, NH, T, D)
            cache[0][i, :, :, pos:pos + T] = k
            cache[1][i, :, :, pos:pos + T] = v
            a = sdpa(q, cache[0][i, :, :, :pos + T], cache[1][i, :, :, :pos + T], is_causal=T > 1)
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, E), *L["proj"])  # (B, T, E)
            h = ln(x, (E,), *L["ln2"])
            x = x + F.linear(F.gelu(F.linear(h, *L["fc"]), approximate="tanh"), *L["out"])
        return F.linear(ln(x[:, -1], (E,), *self.lnf), self.wte)            # (B, V)

    @torch.no_grad()
    def generate(self, prompt, new_tokens, ln, sdpa):
        """Greedy decoding: prompt (B, PROMPT) -> (B, PROMPT + new_tokens)."""
        B = prompt.shape[0]
        cache = torch.empty(2, LAYERS, B, NH, CTX, E // NH, device=self.device)
        out = [prompt]
        tok = self.forward(prompt, 0, cache, ln, sdpa).argmax(-1, keepdim=True)   # (B, 1)
        for step in range(new_tokens):
            out.append(tok)
            if step + 1 < new_tokens:
                tok = self.forward(tok, PROMPT + step, cache, ln, sdpa).argmax(-1, keepdim=True)
        return torch.cat(out, 1)


def _case(device, B, new_tokens):
    def setup():
        model = TinyGPT(device)
        prompt = torch.randint(0, V, (B, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
        fast = lambda: model.generate(prompt, new_tokens, FF.layer_norm, FF.scaled_dot_product_attention)  # noqa
        peer = lambda: model.generate(prompt, new_tokens, F.layer_norm, F.scaled_dot_product_attention)    # noqa
        if not torch.equal(fast(), peer()):
            raise AssertionError("decode: fastseq's and torch's loops chose different tokens")
        weights = sum(t.numel() for L in model.layers for pair in L.values() for t in pair) + model.wte.numel()
        return Setup(fastseq=fast, peers={"torch ops": peer}, bytes=4.0 * weights * new_tokens,
                     flops=2.0 * weights * B * new_tokens)
    return setup


for _dev in ("cpu", "cuda"):
    for _B in (1, 8):
        register(Case("decode", f"GPT-style decode B={_B}, 128 new tokens", _dev, _case(_dev, _B, 128),
                      peers=("torch ops",), quick=False, meta={"B": _B, "new_tokens": 128}))
        register(Case("decode", f"GPT-style decode B={_B}, 32 new tokens", _dev, _case(_dev, _B, 32),
                      peers=("torch ops",), meta={"B": _B, "new_tokens": 32}))


# ============================================================================ fastseq.generate against peers (issue #12)

# The issue's setting: GPT-2's architecture at 6 layers, E = 512, 8 heads, vocab 8192, random
# weights (a Hugging Face GPT2LMHeadModel, and GPT.from_hf of it: identical weights), a 32-token
# prompt, 128 new tokens; no EOS (the config has none), so every row runs to the end and every
# implementation does the same 128 steps with no logits processor.  Settings: greedy at B = 1
# and 8, beam 4 at B = 1, top-k 50 sampling at B = 1.  Peers (peers.py), each optional -- a
# missing one is named in Setup.skipped and the case runs without it:
#   HF generate   Hugging Face's generate on the HF model (without transformers the case is skipped);
#   CTranslate2   the HF model saved and converted (fp32), a ctranslate2.Generator with
#                 torch.get_num_threads() intra-op threads;
#   torch loop    a KV-cache loop on torch's functional ops (greedy and top-k only).
# setup() checks that every peer chooses fastseq's tokens (greedy, beam: without an EOS the beam
# searches of HF and CTranslate2 agree, peers.py), and for sampling only the shapes.
# bytes = the weights one step reads (every parameter but the position table) x steps, so the
# table's "of copy" column is fastseq's tokens/s as a fraction of the weight-read floor (weight
# bytes / copy GB/s per step); a peer's fraction is that divided by the ratio.

_GENERATE_PEERS = {"greedy": ("HF generate", "CTranslate2", "torch loop"), "beam": ("HF generate", "CTranslate2"),
                   "top-k": ("HF generate", "CTranslate2", "torch loop")}


def _hf_gpt(seed=0):
    import transformers

    hc = transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=E, n_layer=LAYERS, n_head=NH,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(hc).eval()


def _generate_case(B, new_tokens, num_beams=1, top_k=0):
    mode = "beam" if num_beams > 1 else "top-k" if top_k else "greedy"

    def setup():
        try:
            hf = _hf_gpt()
        except ImportError as e:
            raise Skipped("skipped: Hugging Face transformers is not installed (pip install transformers)") from e
        from ..generation import generate
        from ..models.gpt import GPT

        model = GPT.from_hf(hf).eval()
        prompt = torch.randint(1, V, (B, PROMPT), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(prompt)
        sample = top_k > 0
        kw = dict(max_new_tokens=new_tokens, num_beams=num_beams, do_sample=sample)

        def seeded():
            return torch.Generator().manual_seed(0) if sample else None

        def fast():
            return generate(model, prompt, mask, top_k=top_k, generator=seeded(), **kw)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(prompt, attention_mask=mask, top_k=top_k or None, temperature=1.0, **kw)[:, PROMPT:]

        peer_fns, skipped = {"HF generate": hf_generate}, {}
        try:
            peers.ct2_gpt2(hf)                             # converted here, not in the timed calls
            peer_fns["CTranslate2"] = lambda: peers.ct2_generate(hf, prompt, new_tokens, num_beams=num_beams,  # noqa
                                                                 top_k=top_k or 1)
        except Skipped as e:
            skipped["CTranslate2"] = str(e)
        if "torch loop" in _GENERATE_PEERS[mode]:
            loop = peers.TorchLoopGPT2(hf)
            peer_fns["torch loop"] = lambda: loop.generate(prompt, new_tokens, top_k=top_k, generator=seeded())  # noqa

        want = fast()[:, PROMPT:]                          # (B, new_tokens)
        for name, fn in peer_fns.items():
            got = fn()
            if got.shape != want.shape or not (sample or torch.equal(got, want)):
                raise AssertionError(f"generation ({mode}, B={B}): fastseq.generate and {name} chose different "
                                     f"tokens (shapes {list(want.shape)} and {list(got.shape)})")
        weights = sum(p.numel() for n, p in model.named_parameters() if n != "pos_emb.weight")
        return Setup(fastseq=fast, peers=peer_fns, skipped=skipped, bytes=4.0 * weights * new_tokens,
                     flops=2.0 * weights * B * num_beams * new_tokens)
    return setup


for _B, _beams, _k in ((1, 1, 0), (8, 1, 0), (1, 4, 0), (1, 1, 50)):
    _what = f"beam {_beams}" if _beams > 1 else f"top-k {_k}" if _k else "greedy"
    _mode = "beam" if _beams > 1 else "top-k" if _k else "greedy"
    register(Case("decode", f"generate GPT-2 shape {_what} B={_B}, 128 new tokens", "cpu",
                  _generate_case(_B, 128, _beams, _k), peers=_GENERATE_PEERS[_mode], quick=False,
                  meta={"B": _B, "new_tokens": 128, "tokens": _B * 128}))


# ============================================================================ encoder-decoder generation (issue #12)

# Sources for both models: B rows of 20-40 tokens (random lengths; ids other than pad 0, bos 1,
# eos 2), right-padded with pad_id, the attention mask 1 at the tokens.  Random weights, eval mode,
# dropout 0.  No EOS: fastseq.generate runs with eos_token_id=None and the peers with no end token,
# so every row of every implementation runs max_new_tokens steps -- the same work, and the beam
# searches agree (peers.py: with an EOS, CTranslate2's and HF's beam conventions differ).
# tokens/s = B x new tokens (the returned sequences; beam search's 4 x more rows not counted).

SEQ2SEQ_V = 8000
SRC_LENGTHS = (20, 40)


def _sources(B, seed=1):
    """(src (B, S) right-padded with 0, src_lengths (B,), attention_mask (B, S)) of B random
    sources of SRC_LENGTHS tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(SRC_LENGTHS[0], SRC_LENGTHS[1] + 1, (B,), generator=g)            # (B,)
    S = int(lengths.max())
    mask = (torch.arange(S).view(1, S) < lengths.view(B, 1)).long()                           # (B, S)
    src = torch.randint(3, SEQ2SEQ_V, (B, S), generator=g).masked_fill_(mask == 0, 0)         # (B, S)
    return src, lengths, mask


def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


# fairseq's transformer (base): E 512, 8 heads, FFN 2048, 6 + 6 post-norm layers, relu, one
# vocabulary of 8000 shared by the source and target embeddings.  The output layer is its own
# matrix (tie_weights=False): with random weights a tied post-norm model scores the decoder's
# input embedding back and repeats one token for ever, which would check little; untied, the
# rows' tokens vary.  Beam 4 at batch 32 (128 decoder rows), 48 new tokens, length_penalty 1
# (without an EOS every hypothesis has the same length, so it cannot reorder them).  Peer:
# CTranslate2's Translator on the same weights (peers.ct2_seq2seq, converted in setup; fp32,
# torch.get_num_threads() threads), beam_size 4, end_token=[]; setup checks it returns
# fastseq's tokens.  Without ctranslate2 the case is skipped (it has no other peer).
# bytes = the decoder's weights one step reads (its layers less the cross-attention key / value
# projections, which run once per source, plus the output layer) x steps; flops = 2 x those x
# B x beams x steps + 2 x the encoder's layer weights x source tokens (attention's own
# arithmetic not counted).

TRANSLATE_B, TRANSLATE_BEAMS, TRANSLATE_NEW = 32, 4, 48


def _translation_case(B, num_beams, new_tokens):
    def setup():
        from ..generation import generate
        from ..models.seq2seq_transformer import TransformerSeq2Seq, TransformerSeq2SeqConfig

        try:                                               # before building the model
            peers.require("ctranslate2")
        except Skipped as e:
            raise Skipped(f"{e} (CTranslate2's Translator is this case's only peer)") from e
        c = TransformerSeq2SeqConfig(vocab_size=SEQ2SEQ_V, dim=512, layers=6, heads=8, ffn_dim=2048, dropout=0.0,
                                     share_embeddings=True, tie_weights=False)
        model = _seeded(lambda: TransformerSeq2Seq(c))
        src, lengths, mask = _sources(B)
        peers.ct2_seq2seq(model)                           # converted here, not in the timed calls

        def fast():
            return generate(model, src, mask, decoder_start_token_id=c.bos_id, num_beams=num_beams,
                            max_new_tokens=new_tokens, length_penalty=1.0, early_stopping=False)[:, 1:]

        def translator():
            return peers.ct2_translate(model, src, lengths, new_tokens, num_beams=num_beams, length_penalty=1.0,
                                       stop_at_eos=False)

        want, got = fast(), translator()                   # (B, new_tokens) each
        if got.shape != want.shape or not torch.equal(got, want):
            raise AssertionError(f"translation (beam {num_beams}, B={B}): fastseq.generate and CTranslate2's "
                                 f"Translator chose different tokens (shapes {list(want.shape)} and "
                                 f"{list(got.shape)}, {int((got != want).sum()) if got.shape == want.shape else '-'} "
                                 f"differ)")
        E = c.dim
        step = sum(p.numel() for p in model.decoder_layers.parameters()) - c.decoder_layers * 2 * E * (E + 1) \
            + model.output_weight.numel()
        encoder = sum(p.numel() for p in model.encoder_layers.parameters())
        return Setup(fastseq=fast, peers={"CTranslate2": translator}, bytes=4.0 * step * new_tokens,
                     flops=2.0 * step * B * num_beams * new_tokens + 2.0 * encoder * int(lengths.sum()))
    return setup


register(Case("decode", f"translate seq2seq Transformer beam {TRANSLATE_BEAMS}, batch {TRANSLATE_B}, "
              f"{TRANSLATE_NEW} new tokens", "cpu", _translation_case(TRANSLATE_B, TRANSLATE_BEAMS, TRANSLATE_NEW),
              peers=("CTranslate2",), quick=False,
              meta={"B": TRANSLATE_B, "num_beams": TRANSLATE_BEAMS, "new_tokens": TRANSLATE_NEW,
                    "tokens": TRANSLATE_B * TRANSLATE_NEW}))


# fairseq's lstm: E 512, a bidirectional 2-layer encoder (H/2 = 512 units a direction), a 2-layer
# LSTMCell decoder of H = 1024 with input feeding and dot-product attention, vocabulary 8000
# shared by the embeddings, its own output layer (as above), U(-0.1, 0.1) weights.  Greedy, 64 new
# tokens, at B = 1 and 16.  Peer: peers.TorchLoopLSTMSeq2Seq, the model written out on torch.nn:
# the sources encoded by a torch.nn.LSTM holding the model's encoder weights (packed, as the
# model), the decoder as torch.nn.LSTMCell layers holding its cells' weights, the attention and
# output layer per step; setup checks it returns fastseq's tokens.  bytes = the weights a decoder
# step reads (cells, attention, output layer) x steps; flops = 2 x those x B x steps + 2 x the
# encoder's weights x source tokens (each token runs through both directions' weights once).

LSTM_NEW = 64


def _lstm_case(B, new_tokens):
    def setup():
        from ..generation import generate
        from ..models.seq2seq_lstm import LSTMSeq2Seq, LSTMSeq2SeqConfig

        c = LSTMSeq2SeqConfig(vocab_size=SEQ2SEQ_V, dim=512, hidden=1024, layers=2, dropout=0.0,
                              share_embeddings=True, tie_weights=False)
        model = _seeded(lambda: LSTMSeq2Seq(c))
        src, lengths, mask = _sources(B)
        loop = peers.TorchLoopLSTMSeq2Seq(model)

        def fast():
            return generate(model, src, mask, decoder_start_token_id=c.bos_id, max_new_tokens=new_tokens)[:, 1:]

        def torch_loop():
            return loop.generate(src, lengths, new_tokens)

        want, got = fast(), torch_loop()                   # (B, new_tokens) each
        if got.shape != want.shape or not torch.equal(got, want):
            raise AssertionError(f"LSTM decoder generation (greedy, B={B}): fastseq.generate and the torch "
                                 f"LSTMCell loop chose different tokens (shapes {list(want.shape)} and "
                                 f"{list(got.shape)})")
        step = sum(p.numel() for p in model.decoder_cells.parameters()) + model.attention_proj.weight.numel() \
            + model.attention_out.weight.numel() + model.output_weight.numel()
        encoder = sum(p.numel() for p in model.encoder.parameters())
        return Setup(fastseq=fast, peers={"torch LSTMCell loop": torch_loop}, bytes=4.0 * step * new_tokens,
                     flops=2.0 * step * B * new_tokens + 2.0 * encoder * int(lengths.sum()))
    return setup


for _B in (1, 16):
    register(Case("decode", f"LSTM decoder generation greedy B={_B}, {LSTM_NEW} new tokens", "cpu",
                  _lstm_case(_B, LSTM_NEW), peers=("torch LSTMCell loop",), quick=False,
                  meta={"B": _B, "new_tokens": LSTM_NEW, "tokens": _B * LSTM_NEW}))
