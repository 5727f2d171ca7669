"""Training: dataset building, LoRA fine-tuning and the evaluation gate (see ARCHITECTURE.md)."""
