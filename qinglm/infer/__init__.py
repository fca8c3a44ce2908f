"""The inference layer, below training and serving: sampling settings and the sampling function
(sampling.py), text decoding and prompt encoding (text.py), the chat template and history fitting
(chat.py), the batched KV-cache engine (engine.py) and its front end generate() (generate.py)."""
