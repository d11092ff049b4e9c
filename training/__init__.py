"""Training and model-import code for codebook-feature language models."""
