"""mm_moslora: LLaVA-style multimodal instruction tuning with MoSLoRA adapters on the language model."""

__version__ = "0.1.0"
