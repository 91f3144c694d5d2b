"""Functional fastseq ops (re-exports)."""
from .attention import scaled_dot_product_attention
from .cross_entropy import cross_entropy, linear_cross_entropy
from .dropout import bias_act_dropout, dropout, dropout_add
from .layer_norm import (add_layer_norm, add_rms_norm, dropout_add_layer_norm, dropout_add_rms_norm, layer_norm,
                         rms_norm)
from .recurrent import gru_layer, layer_norm_gru_layer, layer_norm_lstm_layer, lstm_layer, rnn_layer

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dropout_add_layer_norm",
           "dropout_add_rms_norm", "dropout", "dropout_add", "bias_act_dropout", "cross_entropy",
           "linear_cross_entropy", "scaled_dot_product_attention", "lstm_layer",
           "gru_layer", "rnn_layer", "layer_norm_lstm_layer", "layer_norm_gru_layer"]
