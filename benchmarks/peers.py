"""The systems a benchmark compares: a registry from name to adapter.

Every adapter loads its system for a Job and returns a `Loaded` whose run() makes one
greedy generation of exactly job.new_tokens tokens (end-of-sequence ids suppressed, so
every system does the same work) on the same prompt ids, timed the same way: time to
first token = prompt pass + choosing the first token; then one entry per later token.

    ours            our model folder on ONNX Runtime: Model.step in a NumPy loop (I/O binding on or off)
    torch           our PyTorch decoder (models/llama.py) on the checkpoint the folder came from, eager
    transformers    Hugging Face transformers generate() on that checkpoint (HF folder or GGUF)
    genai           onnxruntime-genai on our folder, through its genai_config.json
    genai-builder   onnxruntime-genai on a model its own builder made from the same checkpoint
    llama.cpp       llama.cpp (llama-cpp-python, `make llama-cpp`) on the GGUF the folder was exported from,
                    in that file's own quantization: the same threads for the prompt and for decoding

Heavy packages (torch, transformers, onnxruntime_genai) are imported inside the adapters,
only when that system runs; a peer whose package is missing is skipped by the harness
before anything is imported (see `missing_modules`).
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .job import Job, Loaded, folder_weight_bytes, timed_greedy
from .stats import Trace


@dataclass(frozen=True)
class Peer:
    name: str
    load: Callable[[Job], Loaded]
    requires: tuple[str, ...] = ()  # importable modules
    install: str = ""  # what to pip install when one is missing
    needs_checkpoint: bool = False
    formats: tuple[str, ...] = ("meta", "hf", "gguf")  # checkpoint formats it can read
    providers: tuple[str, ...] = ("cpu", "cuda", "dml")
    weights: str = "folder"  # whose weights at what precision: a key of PRECISION_OF
    batch_one: bool = False  # runs one sequence only
    memory: float = 1.2  # resident memory when loaded, as a multiple of the folder's weight bytes (measured)


# what precision a peer runs at, from (folder precision, builder precision, provider)
PRECISION_OF: dict[str, Callable[[str, str, str], str]] = {
    "folder": lambda folder, builder, provider: folder,
    "builder": lambda folder, builder, provider: builder,
    # torch runs the checkpoint in float32, or float16 for an fp16 folder on CUDA (CPU fp16 is slow and partial)
    "torch": lambda folder, builder, provider: "fp16" if folder == "fp16" and provider == "cuda" else "fp32",
    "gguf": lambda folder, builder, provider: "gguf",  # the GGUF's own types (SmolLM2's: Q4_1)
}


def missing_modules(peer: Peer) -> list[str]:
    return [m for m in peer.requires if importlib.util.find_spec(m) is None]


def skip_reason(peer: Peer, job: Job) -> str | None:
    """Why this peer cannot run this job (one line), or None."""
    missing = missing_modules(peer)
    if missing:
        return f"{', '.join(missing)} is not installed (pip install {peer.install})"
    if peer.batch_one and job.batch != 1:
        return f"it runs one sequence at a time, not a batch of {job.batch}"
    if job.provider not in peer.providers:
        return f"it runs on {' or '.join(peer.providers)}, not {job.provider}"
    if peer.needs_checkpoint:
        if not job.checkpoint or not Path(job.checkpoint).exists():
            return f"the source checkpoint {job.checkpoint or '(none recorded)'} is not found; pass --checkpoint PATH"
        if job.checkpoint_format not in peer.formats:
            return f"it reads {' or '.join(peer.formats)} checkpoints, this one is {job.checkpoint_format}"
    return None


# ---- ours ---------------------------------------------------------------------------------

def _suppress(logits: np.ndarray, eos_ids: list[int]) -> np.ndarray:
    """Greedy choice [B] from logits [B, V] with end-of-sequence ids ruled out."""
    if eos_ids:
        logits[:, eos_ids] = -np.inf
    return logits.argmax(-1)


def load_ours(job: Job) -> Loaded:
    from llama2_onnx.runtime.session import Model

    model = Model.from_dir(job.model_dir, provider=job.provider, threads=job.threads, io_binding=bool(job.io_binding),
                           huge_pages=job.huge_pages is not False)
    model.wait_for_huge_pages()  # part of loading: the runs see the weights where they stay
    ids = np.tile(np.asarray(job.prompt_ids, np.int64), (job.batch, 1))  # (B, P)
    mask = np.ones_like(ids)
    one = np.ones((job.batch, 1), np.int64)

    def run() -> Trace:
        state = {}

        def prefill():
            # allocating the cache is part of the first token
            cache = state["cache"] = model.new_cache(mask, capacity=ids.shape[1] + job.new_tokens)
            return _suppress(model.step(ids, mask, cache), job.eos_ids)

        def step(prev):
            return _suppress(model.step(prev[:, None].astype(np.int64), one, state["cache"]), job.eos_ids)

        return timed_greedy(prefill, step, job.new_tokens)

    detail = (f"onnxruntime {_version('onnxruntime')} {model.provider.name} io_binding={'on' if job.io_binding else 'off'} "
              f"huge_pages={'on' if model.huge_pages else 'off'}")
    return Loaded(run, detail, folder_weight_bytes(job.model_dir))


# ---- PyTorch eager, our decoder ------------------------------------------------------------

def _torch_device(job: Job) -> str:
    return "cuda" if job.provider == "cuda" else "cpu"


def load_torch(job: Job) -> Loaded:
    import torch

    from llama2_onnx.export.api import build_model
    from llama2_onnx.models import checkpoint

    torch.set_num_threads(job.threads)
    device = _torch_device(job)
    dtype = torch.float16 if job.precision == "fp16" else torch.float32
    model = build_model(checkpoint.load(job.checkpoint), dtype).to(device)
    b, p = job.batch, job.prompt_len
    ids = torch.tensor([job.prompt_ids] * b, device=device)  # (B, P)
    eos = torch.tensor(job.eos_ids, dtype=torch.long, device=device)

    def pick(logits):  # (B, S, V) -> host (B,)
        last = logits[:, -1]
        if len(eos):
            last[:, eos] = -torch.inf
        return last.argmax(-1).cpu().numpy()

    @torch.inference_mode()
    def run() -> Trace:
        state = {}

        def prefill():
            past = [(k.to(device), v.to(device)) for k, v in model.empty_cache(b, dtype)]
            pos = torch.arange(p, device=device).expand(b, p)
            logits, state["past"] = model(ids, torch.ones(b, p, dtype=torch.long, device=device), pos, past)
            state["total"] = p
            return pick(logits)

        def step(prev):
            total = state["total"]
            feed = torch.from_numpy(prev).to(device)[:, None]  # (B, 1)
            pos = torch.full((b, 1), total, dtype=torch.long, device=device)
            mask = torch.ones(b, total + 1, dtype=torch.long, device=device)
            logits, state["past"] = model(feed, mask, pos, state["past"])
            state["total"] = total + 1
            return pick(logits)

        return timed_greedy(prefill, step, job.new_tokens)

    return Loaded(run, f"torch {torch.__version__} eager {str(dtype).replace('torch.', '')} {device}")


# ---- Hugging Face transformers ---------------------------------------------------------------

def load_transformers(job: Job) -> Loaded:
    """generate() timed by a streamer: generate calls put() with the prompt once and then
    with each new token as soon as it is chosen, so the clock sees every token arrive."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(job.threads)
    device = _torch_device(job)
    dtype = torch.float16 if job.precision == "fp16" else torch.float32
    path = Path(job.checkpoint)
    if job.checkpoint_format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    ids = torch.tensor([job.prompt_ids] * job.batch, device=device)
    n = job.new_tokens

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[int] = []

        def put(self, value):
            self.times.append(time.perf_counter_ns())

        def end(self):
            pass

    @torch.inference_mode()
    def run() -> Trace:
        clock = Clock()
        t0 = time.perf_counter_ns()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             min_new_tokens=n, max_new_tokens=n, eos_token_id=job.eos_ids or None,
                             pad_token_id=(job.eos_ids or [0])[0], streamer=clock)
        # times[0] is put(prompt) before the prompt pass; times[1] the first new token
        marks = clock.times[1:]
        ttft = (marks[0] - t0) / 1e6
        token_ms = [(b - a) / 1e6 for a, b in zip(marks, marks[1:])]
        return Trace(ttft, token_ms, out[0, ids.shape[1]:].tolist())

    attn = getattr(model.config, "_attn_implementation", "?")
    return Loaded(run, f"transformers {transformers.__version__} generate attn={attn} {str(dtype).replace('torch.', '')} {device}")


# ---- onnxruntime-genai -------------------------------------------------------------------------

def _genai_model(folder: str, job: Job):
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.clear_providers()
    if job.provider != "cpu":
        config.append_provider(job.provider)
    # genai 0.18 runs one intra-op thread unless told; give it the same count as everyone else
    opts = {"intra_op_num_threads": job.threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    return og, og.Model(config)


def _load_genai_folder(job: Job, folder: str, what: str) -> Loaded:
    og, model = _genai_model(folder, job)
    total = job.prompt_len + job.new_tokens
    prompt = np.array([job.prompt_ids] * job.batch, dtype=np.int32)  # (B, P)

    def run() -> Trace:
        state = {}

        def prefill():
            params = og.GeneratorParams(model)
            # min_length = max_length: end-of-sequence is masked until the last token, as for the others
            params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=job.batch)
            gen = state["gen"] = og.Generator(model, params)
            gen.append_tokens(prompt)  # the prompt pass
            gen.generate_next_token()  # chooses the first token
            return gen.get_next_tokens()

        def step(prev):
            gen = state["gen"]
            gen.generate_next_token()  # runs the model on the previous token, then chooses
            return gen.get_next_tokens()

        trace = timed_greedy(prefill, step, job.new_tokens)
        trace.tokens = list(map(int, state["gen"].get_sequence(0)[job.prompt_len:]))
        return trace

    return Loaded(run, f"onnxruntime-genai {_version('onnxruntime-genai')} {what}", folder_weight_bytes(folder))


def load_genai(job: Job) -> Loaded:
    return _load_genai_folder(job, job.model_dir, "on our folder")


def load_genai_builder(job: Job) -> Loaded:
    folder = job.peer_dir or ""
    precision = json.loads((Path(folder) / "build.json").read_text()).get("precision", "?") if folder else "?"
    return _load_genai_folder(job, folder, f"on its builder's {precision} model")


# ---- llama.cpp ------------------------------------------------------------------------------------

def load_llama_cpp(job: Job) -> Loaded:
    """llama-cpp-python's Llama over the GGUF: eval() the prompt ids in one batch (llama.cpp computes
    the head for the last position only), then one eval() per token; greedy on the last logits."""
    import llama_cpp

    total = job.prompt_len + job.new_tokens
    llm = llama_cpp.Llama(model_path=job.checkpoint, n_ctx=total, n_batch=max(job.prompt_len, 1), n_ubatch=max(job.prompt_len, 1),
                          n_threads=job.threads, n_threads_batch=job.threads, n_gpu_layers=0, logits_all=False,
                          verbose=False, seed=0)
    eos = list(job.eos_ids)

    vocab = llm.n_vocab()

    def pick() -> np.ndarray:  # the last evaluated position's logits (llama.cpp keeps only those) -> [1]
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).copy()
        if eos:
            logits[eos] = -np.inf
        return np.array([int(logits.argmax())])

    def run() -> Trace:
        def prefill():
            llm.reset()  # n_tokens = 0: the next eval() drops the cache
            llm.eval(job.prompt_ids)
            return pick()

        def step(prev):
            llm.eval([int(prev[0])])
            return pick()

        return timed_greedy(prefill, step, job.new_tokens)

    return Loaded(run, f"llama-cpp-python {_version('llama-cpp-python')} on {Path(job.checkpoint).name}",
                  Path(job.checkpoint).stat().st_size)


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


GENAI = dict(requires=("onnxruntime_genai",), install="onnxruntime-genai", providers=("cpu", "cuda", "dml"))
TORCH = dict(needs_checkpoint=True, providers=("cpu", "cuda"), weights="torch", memory=1.8)

PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("ours", load_ours),
        Peer("torch", load_torch, requires=("torch", "safetensors"), install="'llama2-onnx[export]'", **TORCH),
        Peer("transformers", load_transformers, requires=("torch", "transformers"), install="transformers",
             formats=("hf", "gguf"), **TORCH),
        Peer("genai", load_genai, **GENAI),
        # the builder needs transformers (and torch to write an HF copy of a GGUF or Meta checkpoint)
        Peer("genai-builder", load_genai_builder, needs_checkpoint=True, weights="builder",
             requires=("onnxruntime_genai", "transformers", "torch"), install="onnxruntime-genai transformers"),
        Peer("llama.cpp", load_llama_cpp, requires=("llama_cpp",), install="llama-cpp-python (make llama-cpp)",
             needs_checkpoint=True, formats=("gguf",), providers=("cpu",), weights="gguf", batch_one=True, memory=1.0),
    )
}
