"""Preference and post-training stages built on a fine-tuned run: DPO."""
