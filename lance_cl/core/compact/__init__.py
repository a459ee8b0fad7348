"""Compact saved tensors for the ops between the weight layers (same contract as a compressed
layer: the forward output is exact, only what autograd keeps for backward changes).

=============  ==========================================  ========================
op             plain autograd saves                        compact form saves
=============  ==========================================  ========================
ReLU, ReLU6,   its output or input (float)                 1-bit mask
Hardtanh,
LeakyReLU
Dropout        a mask of the input's size                  an 8-byte seed (or 1-bit mask)
MaxPool2d      its input (float) and int64 indices         uint8 in-window offsets
BatchNorm      its input (float)                           x_hat once (float, bf16 or int8)
segment        everything inside it                        its input (recomputed in backward)
chunked        everything inside it                        its input; with the tail kept,
segment                                                    also the tail's masks and offsets
=============  ==========================================  ========================
"""
from .activation import MaskedActivationFunction, masked_activation
from .batchnorm import STORAGES as BATCH_NORM_STORAGES
from .batchnorm import CompactBatchNormFunction, compact_batch_norm
from .bitpack import multiply_by_mask, pack_bits, packed_nbytes, unpack_bits, unpack_factor
from .dropout import MODES as DROPOUT_MODES
from .dropout import CompactDropoutFunction, compact_dropout, keep_mask
from .pooling import CompactMaxPool2dFunction, compact_max_pool2d, fast_max_pool2d
from .recompute import TAILS as SEGMENT_TAILS
from .recompute import recompute_segment

__all__ = ["MaskedActivationFunction", "masked_activation", "CompactBatchNormFunction",
           "compact_batch_norm", "BATCH_NORM_STORAGES", "CompactDropoutFunction", "compact_dropout",
           "keep_mask", "DROPOUT_MODES", "CompactMaxPool2dFunction", "compact_max_pool2d",
           "fast_max_pool2d", "pack_bits", "unpack_bits", "unpack_factor", "multiply_by_mask",
           "packed_nbytes", "recompute_segment", "SEGMENT_TAILS"]
