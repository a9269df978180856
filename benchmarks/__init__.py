"""The benchmark harness: `llama2-onnx bench`, and its Python API.

    from llama2_onnx.benchmarks.harness import run_benchmark
    result = run_benchmark(model="out/llama-2-7b", prompt_len=128, new_tokens=128, peers=["genai"])
    # {"schema": 1, "machine": {...}, "rows": [{"label": "ours io-binding on", "ttft_ms": {...}, ...}, ...]}

Modules: cli (arguments), harness (configurations -> rows), schedule (who runs when),
worker (one system per process), peers (the systems, a registry), job (what a worker is
told), stats (timings -> figures), machine (CPU, versions, read bandwidth), report
(table, JSON, plot), prompts (the prompt ids), builder (onnxruntime-genai's own model),
make_checkpoint (random checkpoints of a given size).
"""
