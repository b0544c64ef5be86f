"""Export a trained model: ONNX (fp32, int8, int4) with a parity and speed report, and GGUF."""

from qtrain.errors import QtrainError


class ExportError(QtrainError, ValueError):
    pass
