"""Functional fastseq ops (re-exports)."""
from .attention import scaled_dot_product_attention
from .layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .recurrent import lstm_layer

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "scaled_dot_product_attention", "lstm_layer"]
