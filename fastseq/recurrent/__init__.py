"""Recurrent family: LSTM, GRU, Elman RNN (tanh / relu), and the layer-normalized LSTM and GRU.

An op family that outgrew one file, read in this order:
  reference.py   the cells step by step in plain torch (the oracles; the layer-normalized cells'
                 "torch" backend)
  rows.py        the row layout of padded and packed batches (torch's PackedSequence), cached by value
  cpu.py         the CPU's table of time loops (kernels/cpu/recurrent.pyx on torch tensors)
  cuda.py        the GPU's table of time loops (torch GEMMs + kernels/cuda/recurrent.py), same signatures
  functions.py   the autograd Functions, one per cell, and the input projection
  ops.py         the Functions as torch.library ops (graph capture: torch.compile, jit.trace)
  cells.py       one record per cell type (Cell) and its fused layer
  functional.py  dispatch, run_layer (the entry the modules share), the functional ops
  nn.py          the torch.nn drop-in modules and cells

Shapes: input (T, B, C) (or (B, T, C) with batch_first), packed rows (N, C); hidden H; G gates
(LSTM 4: i, f, g, o; GRU 3: r, z, n; RNN 1); weight_ih (G H, C), weight_hh (G H, H), biases (G H,).

Layer-normalized cells (Ba et al. 2016; torch has none, its issue 6760), per layer and direction:
  LayerNormLSTM:  G = LN(x W_ih^T) gamma_ih + LN(h W_hh^T) gamma_hh + b_ih + b_hh
                  c' = f c + i g;   h' = o tanh(LN(c') gamma_c + beta_c)
  LayerNormGRU:   x-part = LN(x W_ih^T) gamma_ih + b_ih;  h-part = LN(h W_hh^T) gamma_hh + b_hh,
                  then torch's GRU equations on the two parts.
LN normalizes over the whole gate row (G H) or the cell (H), eps 1e-5 by default; the biases
b_ih / b_hh play the role of the norms' shifts.
"""
from .cells import CELLS, GRU as GRU_CELL, LN_GRU, LN_LSTM, LSTM as LSTM_CELL, RNN_RELU, RNN_TANH, Cell
from .functional import (choose, gru_layer, layer_norm_gru_layer, layer_norm_lstm_layer, lstm_layer, rnn_layer,
                         run_layer)
from .functions import (GRULayerFunction, LayerNormGRULayerFunction, LayerNormLSTMLayerFunction, LSTMLayerFunction,
                        LSTMProjLayerFunction, ProjectionFunction, RNNLayerFunction)
from .nn import GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormLSTM, LSTMCell, RNNCell
from .reference import (gru_step_ref, layer_norm_gru_step_ref, layer_norm_lstm_step_ref, lstm_ref, lstm_step_ref,
                        recurrent_ref, rnn_relu_step_ref, rnn_tanh_step_ref)
from .rows import Rows

__all__ = ["lstm_layer", "gru_layer", "rnn_layer", "layer_norm_lstm_layer", "layer_norm_gru_layer",
           "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU",
           "lstm_ref", "recurrent_ref", "Cell", "CELLS"]
