"""Data: conversation templates and label masks, LLaVA-format datasets, images, batching."""
