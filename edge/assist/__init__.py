"""Voice-assistant interfaces: the Wyoming `handle` service Home Assistant's Assist pipeline
talks to. Like every interface it translates its wire format into engine requests through
edge.launch and the scheduler, and never touches tensors.
"""
