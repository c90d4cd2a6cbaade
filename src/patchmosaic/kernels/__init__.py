"""Optional fused kernels for the streaming softmax engine (:mod:`patchmosaic.engine`).

:func:`fused_softmax_mean` computes one (group, chunk) partial state of
:class:`patchmosaic.engine.SoftmaxMean` in one pass: with Triton (extra
``gpu``) on CUDA tensors or under ``TRITON_INTERPRET=1``, else with the engine
itself.
"""

from patchmosaic.kernels.fused_softmax import (
    PRECISIONS,
    TILES,
    TRITON_AVAILABLE,
    fused_softmax_mean,
    triton_usable,
)

__all__ = ["PRECISIONS", "TILES", "TRITON_AVAILABLE", "fused_softmax_mean", "triton_usable"]
