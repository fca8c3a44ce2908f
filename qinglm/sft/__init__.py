"""Supervised fine-tuning: chat data with assistant-only loss masks, idioms-sft, full and LoRA training."""
