"""Inference: the one generation engine behind chat and evaluation."""
from .engine import InferenceEngine, PromptTooLongError, QuantizationUnavailable, Request, check_quantization

__all__ = ["InferenceEngine", "PromptTooLongError", "QuantizationUnavailable", "Request", "check_quantization"]
