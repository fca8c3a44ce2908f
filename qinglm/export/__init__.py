"""Export a QingLM run to transformers (config.json + safetensors) and GGUF, and import HF checkpoints."""
