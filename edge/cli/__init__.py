"""The `edge-llm` command: run, chat (`chat`), convert, models and rm (`models`), bench,
perplexity, and the commands the
service and serial layers register. The top layer: it may import any other.
"""
