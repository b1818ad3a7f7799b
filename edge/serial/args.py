"""The serial console's command line: `edge-llm serial --port ...` and serve's `--serial PORT`
with its `--serial-*` options. Model and sampling options come from edge.launch.args."""
from __future__ import annotations

import argparse
import sys

import serial

from edge.engine.engine import Engine
from edge.engine.scheduler import Scheduler
from edge.launch import engine_from_args
from edge.launch.args import add_model_args, add_sampling_args, number, request_defaults
from edge.launch.scheduling import start_scheduler
from edge.serial.console import MODES, SerialConsole, log_to_stderr
from edge.serial.port import FLOWS, PortSettings, SerialConsoleError


def add_port_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Line settings and console options; prefix "serial-" gives serve's --serial-baud etc."""
    o = f"--{prefix}"
    p.add_argument(o + "baud", type=number(int, 1), default=115200, help="bits per second (default 115200)")
    p.add_argument(o + "bytesize", type=int, choices=[5, 6, 7, 8], default=8)
    p.add_argument(o + "parity", type=str.upper, choices=list(serial.PARITY_NAMES), default="N")
    p.add_argument(o + "stopbits", type=float, choices=[1, 1.5, 2], default=1)
    p.add_argument(o + "flow", choices=FLOWS, default="none",
                   help="flow control: rtscts (hardware, needs the CTS/RTS wires) or xonxoff (software)")
    p.add_argument(o + "mode", choices=MODES, default="human",
                   help="human: prompt, echo, /commands; jsonl: one JSON request/event per line")
    p.add_argument(o + "echo", action=argparse.BooleanOptionalAction, default=True,
                   help="echo typed characters back (terminals in raw mode do not echo locally)")
    p.add_argument(o + "line-limit", type=number(int, 1), default=4096, help="longest input line in bytes")
    p.add_argument(o + "system", default=None, help="system prompt for the serial chat")


def add_serial_args(p: argparse.ArgumentParser) -> None:
    """For `edge-llm serve`: --serial PORT plus --serial-baud, --serial-flow, ..."""
    p.add_argument("--serial", metavar="PORT", default=None,
                   help="also run the serial console on PORT (/dev/ttyAMA0, /dev/serial0, /dev/ttyGS0)")
    add_port_args(p, prefix="serial-")


def _opt(a, prefix: str, name: str):
    return getattr(a, (prefix + name).replace("-", "_"))


def console_from_args(a, engine: Engine, scheduler: Scheduler, port: str, prefix: str = "",
                      log=log_to_stderr) -> SerialConsole:
    """The command's sampling flags over the product defaults (256 tokens a reply, not
    serve's "rest of the context": too long for a terminal)."""
    settings = PortSettings(port, _opt(a, prefix, "baud"), _opt(a, prefix, "bytesize"), _opt(a, prefix, "parity"),
                            _opt(a, prefix, "stopbits"), _opt(a, prefix, "flow"))
    return SerialConsole(engine, scheduler, settings, mode=_opt(a, prefix, "mode"), echo=_opt(a, prefix, "echo"),
                         system=_opt(a, prefix, "system"), params=request_defaults(a),
                         line_limit=_opt(a, prefix, "line-limit"), log=log)


def start_from_args(a, engine: Engine, scheduler: Scheduler, log=None) -> SerialConsole | None:
    """serve's hook: None without --serial; raises SerialConsoleError if the port is unusable."""
    if not getattr(a, "serial", None):
        return None
    import logging
    log = log or logging.getLogger("edge.serial").info     # serve logs through `logging`
    return console_from_args(a, engine, scheduler, a.serial, prefix="serial_", log=log).start()


def cmd_serial(a) -> int:
    engine = engine_from_args(a, log=log_to_stderr)
    scheduler = start_scheduler(engine)
    console = console_from_args(a, engine, scheduler, a.port)
    try:
        console.start().wait()
    except SerialConsoleError as e:
        print(f"edge-llm serial: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        console.stop()
    return 0


def register(sub) -> None:
    s = sub.add_parser("serial", help="chat over a serial port (GPIO UART or USB gadget)")
    s.add_argument("--port", required=True, help="e.g. /dev/ttyAMA0 (Pi 5 GPIO UART), /dev/ttyGS0 (USB gadget)")
    add_port_args(s)
    add_model_args(s)
    add_sampling_args(s)
    s.set_defaults(func=cmd_serial)
