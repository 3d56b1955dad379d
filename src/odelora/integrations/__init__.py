"""Integrations with PEFT, transformers, torch.distributed and DeepXDE (optional extras)."""
