"""The serial console (GPIO UART or USB gadget): port handling, a line editor for raw
terminals, and the human and JSON-lines protocols. May import edge.launch and edge.engine;
never touches tensors.
"""
