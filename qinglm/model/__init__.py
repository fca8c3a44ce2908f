"""The model layer: the Transformer (transformer.py), MoE feed-forward layers (moe.py), LoRA (lora.py),
int8 weights (quantize.py) and the Hugging Face names of QingLM's weights (hf_layout.py)."""
