"""Offline conversion: checkpoint (HF directory | GGUF) -> edge-llm bundle."""
