"""Inference: the one generation engine behind chat and evaluation, and its static-cache decoder."""
from .engine import (DECODE_MODES, InferenceEngine, PromptTooLongError, QuantizationUnavailable, ReplyOptions,
                     Request, check_quantization, left_pad)
from .static_decode import CudaGraphCaptureError, StaticDecoder, Timings

__all__ = ["DECODE_MODES", "CudaGraphCaptureError", "InferenceEngine", "PromptTooLongError", "QuantizationUnavailable",
           "ReplyOptions", "Request", "StaticDecoder", "Timings", "check_quantization", "left_pad"]
