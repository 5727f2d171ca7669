"""Training: dataset building, LoRA fine-tuning and the evaluation gate (see docs/architecture.md)."""
