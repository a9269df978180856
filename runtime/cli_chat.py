"""CLI (not implemented yet)."""

from llama2_onnx.errors import UserError


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise UserError("not implemented yet")
