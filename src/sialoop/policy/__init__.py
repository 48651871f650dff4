"""The policy: a base model plus optional LoRA adapters, served on an OpenAI-compatible endpoint."""
