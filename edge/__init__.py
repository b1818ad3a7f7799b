"""edge-llm runtime: bundle loading, the NumPy KV-cache decode loop, engine and interfaces."""
