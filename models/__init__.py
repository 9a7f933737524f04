"""Model families built as megatron-core `GPTModel`s; sizes are code (`models/llama.py`)."""
