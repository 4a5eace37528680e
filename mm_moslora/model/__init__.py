"""The multimodal model: open_clip vision tower -> projector -> Hugging Face causal LM."""
