"""The serial console (GPIO UART or USB gadget). May import edge.launch and edge.engine
(the reply through `edge.engine.replies`, the refusals from edge.engine); never touches tensors.

- port: line settings, opening the port, the transport (reads, the writer thread, the outbox)
- line_editor: raw terminal bytes -> edited lines
- console: the loop (threads, reconnects, type-ahead, Ctrl-C, stalls) shared by the protocols
- protocol: what a protocol implements; human and jsonl: the two protocols
- args: the command line (`edge-llm serial`, serve's `--serial-*`)
"""
