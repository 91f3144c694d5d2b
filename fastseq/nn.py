"""Drop-in torch.nn modules on fastseq kernels (re-exports)."""
from .cross_entropy import CrossEntropyLoss, LinearCrossEntropyLoss
from .dropout import Dropout
from .layer_norm import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm
from .multihead_attention import MultiheadAttention
from .recurrent.nn import GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormLSTM, LSTMCell, RNNCell
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "Dropout", "LayerNorm", "RMSNorm", "AddLayerNorm", "AddRMSNorm", "MultiheadAttention",
           "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
           "Transformer", "LSTM", "GRU", "RNN",
           "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU"]
