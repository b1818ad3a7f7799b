"""`edge-llm`: run, chat, convert, and the commands the other layers register (bench,\nperplexity, serial, serve, prepare)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from convert.convert import CONVERT_THREADS, GPTQ_BY_DEFAULT, ROTATE_BY_DEFAULT, ROTATE_ONLY_WITH_GPTQ
from convert.quantize import BIG_MODEL_PARAMS, BIG_MODEL_QUANT, DEFAULT_QUANT, SCHEMES
from edge.engine import replies
from edge.launch import engine_from_args
from edge.launch.args import add_model_args, add_sampling_args, positive, request_defaults


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_engine(a):
    return engine_from_args(a, log=_log)


def stream(events, out=sys.stdout):
    """Print the reply as it comes; return the final event."""
    last = None
    for piece in replies.stream(events):
        if piece.text:
            out.write(piece.text)
            out.flush()
        last = piece.final or last
    return last


def format_stats(usage) -> str:
    return (f"prompt {usage.prompt_tokens} tok ({usage.cached_tokens} cached), "
            f"generated {usage.completion_tokens} tok, first token {usage.time_to_first_token * 1000:.0f} ms, "
            f"{usage.decode_tokens_per_second:.1f} tok/s")


def read_prompt(prompt: str | None, stdin=None) -> str:
    """The prompt argument, or standard input when it is `-` or omitted and stdin is not a
    terminal (`echo question | edge-llm run`)."""
    stdin = stdin or sys.stdin
    if prompt is None and stdin.isatty():
        raise ValueError("no prompt: give one as an argument, or pipe it in (echo 'question' | edge-llm run -)")
    if prompt is None or prompt == "-":
        text = stdin.read()
        if not text.strip():
            raise ValueError("the prompt read from standard input is empty")
        return text.rstrip("\n")
    return prompt


def output_grammar(a):
    """--format json / --json-schema FILE as a Grammar (None: free text). Read before the model
    loads, so that a missing or broken file fails at once."""
    from edge.engine.constraint import Grammar, closed
    if a.json_schema:
        try:
            schema = json.loads(Path(a.json_schema).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema {a.json_schema}: not JSON: {e}") from None
        return Grammar.json_schema(closed(schema), origin=f"--json-schema {a.json_schema}")
    if a.format == "json":
        return Grammar.json_object(origin="--format json")
    return None


def cmd_run(a) -> int:
    prompt = read_prompt(a.prompt)           # before loading: a missing prompt fails at once
    grammar = output_grammar(a)
    engine = load_engine(a)
    if grammar is not None:
        engine.check_grammar(grammar)
    params = request_defaults(a).build(constraint=grammar)
    if a.raw:
        ids = engine.encode_text(prompt)
    else:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
        ids = engine.encode_chat(msgs)
    last = stream(engine.generate(ids, params))
    print()
    u = last.usage
    if (last.finish_reason == "length" and not (params.max_tokens and u.completion_tokens >= params.max_tokens)
            and u.prompt_tokens + u.completion_tokens + 1 < engine.max_ctx):
        _log(f"edge-llm: the answer was stopped after {u.completion_tokens} tokens: it was repeating itself "
             "(--stop-loops off lets it run on)")
    if a.verbose:
        _log(format_stats(last.usage))
    return 0


def cmd_chat(a) -> int:
    from edge.cli import chat
    engine = load_engine(a)
    return chat.run(a, engine, request_defaults(a), format_stats)


def cmd_convert(a) -> int:
    from convert.convert import convert
    convert(a.src, a.output, quant=a.quant, overwrite=a.force, rotate=a.rotate,
            smooth=not a.no_smooth, gptq=a.gptq, head=a.head, threads=a.threads)
    _log(f"wrote {a.output}")
    return 0


class DefaultsShown(argparse.HelpFormatter):
    """Every option that takes a value shows its default: the help text's own wording when it
    has one ("default ..."), else argparse's value ("(default: 8)", "(default: none)")."""

    @staticmethod
    def with_default(action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or action.required:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text                                      # a required positional
        if action.nargs == 0:                                # a flag: off unless given
            return text
        shown = "none" if action.default in (None, [], ()) else "%(default)s"
        return f"{text} (default: {shown})".strip()

    def _get_help_string(self, action) -> str:
        return self.with_default(action)


def _no_silent_options(parser: argparse.ArgumentParser) -> None:
    """argparse prints nothing for an option without help text, not even its default: give
    every such option (whichever module registered it) at least its default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_silent_options(sub)
        elif not action.help and action.help is not argparse.SUPPRESS:
            action.help = DefaultsShown.with_default(action)


class EdgeParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsShown)
        super().__init__(*args, **kwargs)


def _generating(p: argparse.ArgumentParser, func) -> None:
    """A command that generates: the system prompt, the model and sampling options."""
    p.add_argument("--system", "-p", help="system prompt (default: none)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = EdgeParser(prog="edge-llm", description="Llama-family LLMs on a Raspberry Pi 5")
    p.add_argument("--version", action="version", version=f"edge-llm {version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=EdgeParser)

    r = sub.add_parser("run", help="answer one prompt, streaming; stdout carries only the answer",
                       description="Answer one prompt. The answer alone goes to stdout (progress and "
                       "statistics go to stderr), so it can be piped: echo 'question' | edge-llm run - | head")
    r.add_argument("prompt", nargs="?", default=None,
                   help="the prompt; '-' or omitted with a pipe on stdin: read it from stdin")
    r.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    r.add_argument("--verbose", "-v", action="store_true", help="print speed statistics to stderr")
    shape = r.add_mutually_exclusive_group()
    shape.add_argument("--format", choices=["json"], default=None,
                       help="json: the answer is one JSON object (default: free text)")
    shape.add_argument("--json-schema", metavar="FILE", default=None,
                       help="the answer is JSON valid against the JSON schema in FILE (default: none)")
    _generating(r, cmd_run)

    c = sub.add_parser("chat", help="interactive chat in the terminal (/help inside)",
                       description='Chat in the terminal: line editing and history, """ for several lines, '
                       "/help, /context, /stats, /set, /save FILE, /load FILE; replies wrap to the terminal's "
                       "width; Ctrl-C stops a reply, Ctrl-D exits.")
    c.add_argument("--file", "-f", help="put this text file's contents before the first question (default: none)")
    _generating(c, cmd_chat)

    v = sub.add_parser("convert", help="convert a checkpoint (HF directory or GGUF) into a bundle",
                       description="Convert a Hugging Face checkpoint directory or a GGUF file into a bundle: "
                       "a TFLite graph with int8/int4 weights and the tokenizer, which every other command "
                       "runs (--model DIR). Converting is needed once; --model with a checkpoint does it itself.")
    v.add_argument("src", help="Hugging Face checkpoint directory or GGUF file")
    v.add_argument("-o", "--output", required=True, help="bundle directory to write")
    v.add_argument("--quant", default=None, choices=SCHEMES,
                   help=f"weight format of the graph (default {DEFAULT_QUANT} below {BIG_MODEL_PARAMS // 10**6} M "
                        f"parameters, {BIG_MODEL_QUANT} from there; f16/f32 bundles also run on the numpy backend)")
    v.add_argument("--force", action="store_true", help="replace an existing output")
    v.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="integer quants: fold outlier-spreading rotations into the weights "
                        f"(default: {', '.join(ROTATE_BY_DEFAULT)}, where it measured better; "
                        f"{', '.join(ROTATE_ONLY_WITH_GPTQ)} only together with GPTQ)")
    v.add_argument("--no-smooth", action="store_true",
                   help="integer quants: skip the calibrated per-channel smoothing (for comparison)")
    v.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                   help="integer quants: GPTQ's error-compensating rounding instead of round-to-nearest "
                        f"(default: {', '.join(GPTQ_BY_DEFAULT)}, where it measured better)")
    v.add_argument("--head", default=None, metavar="SCHEME",
                   help="integer quants: the lm_head's format (and so a tied embedding's), e.g. int8, int4, "
                        "int4-b32; default: the one chosen for --quant")
    v.add_argument("--threads", type=positive, default=None,
                   help=f"worker threads while converting (default: one per core), each with {CONVERT_THREADS} "
                        "NumPy thread: steady beside other work, and the same bundle for any count")
    v.set_defaults(func=cmd_convert)

    from edge.cli import bench, models, perplexity
    from edge.serial import args as serial_args
    from edge.service import serve
    models.register(sub)
    from edge.cli import model_cmds
    model_cmds.register(sub)
    bench.register(sub)
    perplexity.register(sub)
    serial_args.register(sub)
    serve.register(sub)
    _no_silent_options(p)
    _every_command_described(p)
    return p


def _every_command_described(parser: argparse.ArgumentParser) -> None:
    """`edge-llm CMD --help` says what CMD does: a subcommand without a description of its own
    gets its one-line help as one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    text = helps[name]
                    sub.description = text[0].upper() + text[1:] + "."


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as package_version
    try:
        return package_version("edge-llm")
    except PackageNotFoundError:      # run from a source tree that was never installed
        return "unknown"


def _quiet_broken_pipe() -> int:
    """The reader went away (`edge-llm run ... | head`): that is how a pipe ends, not an error.
    Point stdout at /dev/null so that the interpreter's final flush does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as e:
        if os.environ.get("EDGE_LLM_DEBUG"):
            raise
        _log(f"edge-llm: error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
