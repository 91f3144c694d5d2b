"""Functional fastseq ops (re-exports)."""
from .attention import scaled_dot_product_attention
from .layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .recurrent import gru_layer, layer_norm_gru_layer, layer_norm_lstm_layer, lstm_layer, rnn_layer

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "scaled_dot_product_attention", "lstm_layer",
           "gru_layer", "rnn_layer", "layer_norm_lstm_layer", "layer_norm_gru_layer"]
