"""`llama2-onnx score INPUT OUTPUT [MODEL]`: batch scoring through the serving engine, restartable.

INPUT: an OpenAI Batch .jsonl file (OUTPUT: a .jsonl file), or an Azure ML batch CSV file or
folder of CSV files (OUTPUT: a folder, predictions in OUTPUT/predictions.csv). See serve/score.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.cli_common import add_model_arguments, model_folder, open_generator


def add_arguments(p) -> None:
    p.add_argument("input", help="OpenAI Batch .jsonl file, or Azure ML batch .csv file or folder of .csv files")
    p.add_argument("output", help="output .jsonl file (OpenAI Batch) or folder (Azure ML CSV: predictions.csv in it); "
                                  "new, or score's own output for INPUT, which it resumes (anything else is refused)")
    add_model_arguments(p)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--parameters", default=None, metavar="JSON",
                   help='CSV input: Hugging Face generation parameters, as /score takes them, e.g. \'{"max_new_tokens": 64}\'')
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="per-item time limit in seconds (default none)")


def run(args) -> int:
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.timeout is not None and not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    try:
        parameters = json.loads(args.parameters) if args.parameters else None
    except json.JSONDecodeError as e:
        raise UserError(f"--parameters is not JSON ({e.msg})") from None
    try:
        from .score import open_job, score
        from .service import Service
    except ImportError as e:
        raise UserError(f"score needs the serve extra ({e.name} is missing): pip install 'llama2-onnx[serve]'") from None
    output = Path(args.output)
    job = open_job(Path(args.input), output, parameters)  # bad input or output fails here, before the model loads
    try:
        folder = model_folder(args)
        service = Service.from_generator(open_generator(args), max_batch=args.max_batch, max_queue=4 * args.max_batch,
                                         timeout_s=args.timeout, model_id=folder.name)
    except BaseException:
        job[1].discard()  # an OUTPUT this run made is removed: nothing was answered
        raise
    try:
        summary = score(service, job, progress=sys.stderr.isatty())
    finally:
        service.close()
    print(f"score: {summary}; output in {output}", file=sys.stderr)
    return 0
