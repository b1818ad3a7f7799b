"""edge-llm's runtime. Layers, top to bottom; a module imports only from layers below it:

    cli/      edge-llm's commands (run, chat, convert, models, rm, bench, perplexity)
    service/  `serve`: one process wiring the interfaces to one engine, systemd notify
    api/      HTTP: the OpenAI-compatible API, its schema, metrics, the chat page at /
    serial/   the serial console (human and JSON-lines protocols)
    launch/   resolve a model, build the engine, turn options into a request (shared args)
    engine/   generation loop, scheduler, sampler, detokenizer, stop strings, chat template
    model/    config, bundle, the KV cache, attention, the NumPy and LiteRT backends
"""
