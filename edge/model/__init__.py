"""The model layer: a bundle on disk becomes a function from tokens to logits.

Owns: the model config, the bundle (manifest, hashes, mmapped tensors), RoPE, the KV cache,
attention, the NumPy reference model (`numpy_model`, the Llama layer written once) and the
fast LiteRT backend (`litert_model`, `litert_runner`), chosen by `backends.load_backend`.
Imports nothing else from edge/; knows nothing of requests, text or interfaces.
"""
