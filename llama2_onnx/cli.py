"""The ``llama2-onnx`` command: dispatches to each part's CLI.

Each part (export, runtime, benchmarks) has a torch-free ``cli`` module with
``add_arguments(parser)`` and ``run(args)``; torch is imported only inside the
``run`` of the commands that need it, so ``--help`` works without torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__, frozen
from .errors import UserError

# subcommand -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("llama2_onnx.export.cli", "convert a Llama checkpoint (Meta .pth, HF safetensors, GGUF) to an ONNX model folder"),
    "generate": ("llama2_onnx.runtime.cli_generate", "generate text from a prompt with an exported model"),
    "chat": ("llama2_onnx.runtime.cli_chat", "chat with an exported model (the default model when none is given)"),
    "classify": ("llama2_onnx.runtime.cli_classify", "label texts with an exported sequence classifier (LlamaForSequenceClassification)"),
    "serve": ("llama2_onnx.serve.cli", "serve a model over HTTP: the OpenAI API, Azure ML /score, metrics (the default model when none is given)"),
    "score": ("llama2_onnx.serve.cli_score", "answer an OpenAI Batch file or Azure ML batch CSV files without a server; restartable"),
    "bench": ("llama2_onnx.benchmarks.cli", "benchmark prompt and decode speed, with and without I/O binding, against peers"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="llama2-onnx", description="Export Llama 2 checkpoints to ONNX and run them on ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"llama2-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        if frozen.FROZEN and name in frozen.REFUSED:  # listed, never parsed: main() refuses it first
            sub.add_parser(name, help=help_text + " (not in the desktop app)")
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if frozen.FROZEN and argv and argv[0] in frozen.REFUSED:  # whatever options follow: one line
        print(f"llama2-onnx {argv[0]}: error: {frozen.REFUSED[argv[0]]}", file=sys.stderr)
        return 2
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return modules[args.command].run(args) or 0
    except UserError as e:
        print(f"llama2-onnx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def app_main(argv: list[str] | None = None) -> int:
    """The desktop app's entry (packaging/app_main.py): the command with arguments; with none, the chat
    page on a free port, opened in the default browser, on the model next to the app (frozen.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        return main(argv)
    from llama2_onnx.runtime.cli_common import default_model

    try:
        model = default_model()  # the app's own, else the cached default, else a message for an app user
    except UserError as e:
        print(f"llama2-onnx: {e}", file=sys.stderr)
        return 2
    print(f"opening the chat page for {model} (Ctrl+C stops the app)", flush=True)
    return main(["serve", str(model), "--host", "127.0.0.1", "--port", "0", "--open"])


if __name__ == "__main__":
    sys.exit(main())
