"""Nexus-Gen (Qwen2.5-VL with a vision head regressing image embeddings): issue #22, in progress."""
