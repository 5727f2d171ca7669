"""Training: dataset building, LoRA fine-tuning and the evaluation gate (docs/architecture.md)."""
