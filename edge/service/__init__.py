"""`edge-llm serve` and `prepare`: one process, one engine and scheduler, the HTTP API and
optional serial console on top, and systemd's notify/watchdog protocol (`sd_notify`).
May import the interfaces (edge.api, edge.serial, edge.assist) and everything below them.
"""
