"""Model side: tokenizer/policy/reference loading, LoRA, GGUF conversion, log-prob forward, saving."""
