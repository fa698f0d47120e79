"""The integer-only program of a calibrated QVit (FQ-ViT, arXiv 2111.13824: every operation in integers).

:mod:`models.integer.lower` turns a calibrated :class:`~models.quant_vit.QVit` into a
:class:`~models.integer.program.Program`: a list of integer operations (:mod:`models.integer.ops`) on
int8 / uint8 / int16 / int32 tensors, whose only float steps are the image's quantization at the input
and the logits' scale at the output. :func:`models.integer.program.run` executes it in PyTorch (CPU or
CUDA); :mod:`utils.integer_onnx` writes the same program as standard ONNX. The arithmetic of each
operation, with its rounding and its error bound against float64, is one module each: requantization by
dyadic numbers (:mod:`~models.integer.dyadic`), the integer square root (:mod:`~models.integer.isqrt`),
LayerNorm (:mod:`~models.integer.layernorm`), softmax (:mod:`~models.integer.softmax`), GELU
(:mod:`~models.integer.gelu`) and exact integer matrix products (:mod:`~models.integer.matmul`).

This package imports nothing at import time: :mod:`models.ptq.layers` uses its softmax and GELU, so the
fake-quant model simulates exactly what the program computes.
"""


class IntegerUnsupported(ValueError):
    """The calibrated model has a point or a feature the integer program cannot express (one line)."""
