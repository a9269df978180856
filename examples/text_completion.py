"""Meta's example_text_completion.py on an ONNX model folder: same prompts, same printed layout.

    python examples/text_completion.py [MODEL_DIR] [--temperature 0.6] [--top-p 0.9]
        [--max-seq-len 128] [--max-gen-len 64] [--max-batch-size 4]

Without MODEL_DIR it runs the default model (SmolLM2-135M-Instruct, exported on first use).
"""

from __future__ import annotations

import argparse
from typing import List

from llama2_onnx.runtime import Llama


def main(model_dir: str | None = None, temperature: float = 0.6, top_p: float = 0.9, max_seq_len: int = 128,
         max_gen_len: int = 64, max_batch_size: int = 4) -> None:
    if model_dir is None:
        from llama2_onnx.assets import default_model_dir

        model_dir = default_model_dir()
    generator = Llama.build(model_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)

    prompts: List[str] = [
        # For these prompts, the expected answer is the natural continuation of the prompt
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,
        
        I just """,
        # Few shot prompt (providing a few examples before asking model to complete more);
        """Translate English to French:
        
        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Meta's text completion example on an ONNX model folder")
    p.add_argument("model_dir", nargs="?", default=None, help="model folder (default: the default model)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--max-gen-len", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=4)
    main(**vars(p.parse_args()))
