"""The engine layer: requests in, streamed text out.

Owns: the generation loop with prefix reuse and the one context rule (`engine`), the shared
request queue (`scheduler`), sampling, UTF-8-safe detokenizing, stop strings, chat templates
and multi-turn conversations. May import edge.model; never an interface or edge.launch.
"""
