"""Voice-assistant interfaces: the Wyoming `handle` service Home Assistant's Assist pipeline
talks to. Like every interface it translates its wire format into engine requests through
edge.launch and the scheduler, and never touches tensors. May import edge.launch and
edge.engine (the reply through `edge.engine.replies`, the refusals `ContextFull`/`QueueFull`
from edge.engine); never edge.api or edge.serial.
"""
