"""Model: an ONNX Runtime session over a model folder, with the KV cache kept on the device.

With io_binding=True every present.{i}.key/value output is bound to the device and fed
back as the next step's past input as the same OrtValue: the cache never travels to the
host. Only logits come back to NumPy, and the caller gets the last position only: the graph
computes the head for that position alone (logits_to_keep = 1, runtime/contract.py) unless
every position's logits are asked for (all_logits), or the folder predates that input.
With io_binding=False the same steps run on plain NumPy feeds (the reference path).

The fused graph (config graph "ort", GroupQueryAttention) keeps each layer's cache in one
buffer of a fixed capacity [B, n_kv_heads, capacity, head_dim], bound as both the past input
and the present output: each step writes its new keys and values in place, nothing is
copied. Rows are right-aligned for it (each row's tokens from slot 0, its length counted
by the attention mask); the caller still passes left-padded prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from llama2_onnx.errors import UserError

from . import contract, hugepages, session_cache
from .folder import FolderConfig, ModelFolderError, check_folder
from .graph_check import check_graph_io
from .providers import Provider, open_with_fallback, physical_cores, resolve

LOAD_STAGES = ("verify", "session", "tokenizer")  # Generator.from_dir's progress stages, in order


@dataclass
class KVCache:
    """Per-sequence state between steps. Each past tensor is [B, n_kv_heads, length, head_dim]."""

    past: list  # OrtValue (io binding) or np.ndarray, 2 * n_layers of them
    attention_mask: np.ndarray  # int64 [B, length]; 0 marks left padding
    next_pos: np.ndarray  # int64 [B]: position id of each row's next token (= real tokens so far)
    length: int = 0
    capacity: int = 0  # fused graph: slots in each shared buffer
    binding: object = None  # fused graph with io binding: one IOBinding kept across steps
    step_logits: tuple | None = None  # (np.ndarray [B, 1, V], its OrtValue): where one-token steps write

    @property
    def batch(self) -> int:
        return self.attention_mask.shape[0]


@dataclass
class Model:
    folder: Path
    config: FolderConfig
    session: ort.InferenceSession
    provider: Provider
    io_binding: bool = True
    device_id: int = 0
    huge_pages: object = None  # the thread moving the weights into huge pages (see hugepages.py), or None
    startup: str = "off"  # the start-up cache (session_cache.py): "off", "hit" (opened from it) or "written"
    # prompt passes longer than this run in chunks of it (None: the provider's default, PROMPT_CHUNK
    # on the CPU; 0: never): see step()
    prompt_chunk: int | None = None
    _kv_dtype: np.dtype = field(init=False)

    def __post_init__(self) -> None:
        self._kv_dtype = np.dtype(self.config.kv_dtype)
        a = self.config.model
        self._past_names = contract.past_names(a.n_layers)
        self._present_names = contract.present_names(a.n_layers)
        self.fused = self.config.graph == contract.GRAPH_ORT
        # the head for the last position only (the optional input logits_to_keep; older folders lack it)
        self.keeps_logits = contract.LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}
        if self.prompt_chunk is None:
            self.prompt_chunk = PROMPT_CHUNK if self.provider.name == "cpu" else 0

    @classmethod
    def from_dir(cls, path: str | Path, provider: str = "auto", threads: int | None = None,
                 io_binding: bool = True, check_hashes: bool | None = None, device_id: int = 0,
                 huge_pages: bool = True, progress=None, task: str = contract.TASK_GENERATION,
                 startup_cache: bool = True) -> "Model":
        """Open a model folder written by `llama2-onnx export`.

        Checks the manifest (file sizes always; sha256 on the first load of the folder, or
        always with check_hashes=True, never with False), reads config.json, checks that every
        external-data location is a file of the folder listed in the manifest (runtime.folder.check_folder),
        opens the session, then checks config.json against the graph's inputs and outputs.
        The session is opened on provider ('auto', 'cpu', 'cuda' or 'dml') with threads
        intra-op threads (default: the physical cores). On the CPU with huge_pages (Linux),
        a background thread then moves the weights into 2 MB pages (wait_for_huge_pages()).
        A provider that fails to start falls back to the CPU with a one-line note (providers.py).
        progress(stage, done, total), if given, is called as "verify" and "session" begin (LOAD_STAGES).
        task: what the caller runs (contract.TASKS); a folder of another task is refused in one line.
        startup_cache (CPU): open the optimized, prepacked graph kept in the cache folder by an earlier
        start of this folder with this ONNX Runtime on this CPU, or write it on this start (session_cache.py).
        """
        folder = Path(path)
        if progress:
            progress("verify", 0, len(LOAD_STAGES))
        config = check_folder(folder, hashes=check_hashes)
        if config.task != task:
            raise ModelFolderError(wrong_task(folder, config, task))
        prov = resolve(provider)
        if progress:
            progress("session", 1, len(LOAD_STAGES))
        model_path = folder / contract.MODEL_FILE  # an LFS pointer fails the manifest's size check
        try:
            (session, startup), prov = open_with_fallback(
                lambda p: _open(model_path, p, threads, device_id, startup_cache), prov,
                used=lambda opened: opened[0].get_providers()[0])
        except Exception as e:  # ORT raises its own types; one line for the user
            raise ModelFolderError(f"onnxruntime could not load {model_path}: {str(e).splitlines()[0]}") from None
        check_graph_io(folder, config, session.get_inputs(), session.get_outputs())
        moving = hugepages.collapse_in_background() if huge_pages and prov.name == "cpu" else None
        return cls(folder=folder, config=config, session=session, provider=prov, io_binding=io_binding,
                   device_id=device_id, huge_pages=moving, startup=startup)

    def wait_for_huge_pages(self, timeout: float | None = None) -> None:
        """Block until the weights are in huge pages (at once where none are being moved)."""
        if self.huge_pages is not None:
            self.huge_pages.join(timeout)

    # ---- cache ---------------------------------------------------------------
    def new_cache(self, attention_mask: np.ndarray, capacity: int | None = None) -> KVCache:
        """An empty cache for a batch whose prompt mask is attention_mask [B, S] (left padded).

        capacity (fused graph only): the tokens each row will hold at most, prompt included
        (default: the model's context); the buffers grow if a step needs more."""
        a = self.config.model
        b = attention_mask.shape[0]
        cap = min(capacity or a.max_seq_len, a.max_seq_len) if self.fused else 0
        return KVCache(past=self._buffers(b, cap), attention_mask=np.zeros((b, 0), np.int64),
                       next_pos=np.zeros(b, np.int64), capacity=cap)

    def _buffers(self, batch: int, length: int) -> list:
        a = self.config.model
        shape = (batch, a.n_kv_heads, length, a.head_dim)
        buffers = [np.zeros(shape, self._kv_dtype) for _ in self._past_names]
        return [self._to_device(x) for x in buffers] if self.io_binding else buffers

    def _to_device(self, array: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(array, self.provider.device, self.device_id)

    # ---- one step ----------------------------------------------------------------
    def step(self, input_ids: np.ndarray, new_mask: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run input_ids [B, S] (with their mask [B, S]) after the cache; return last logits [B, V].

        Position ids count real tokens only, so a left-padded row gets the positions it
        would have alone; the cache is advanced in place. all_logits=True returns every
        position's logits instead, [B, S, V] in input_ids' own layout (column s: the logits
        after input token s; padding columns hold nothing useful): prompt logprobs.

        A step longer than prompt_chunk with no padding (and of one row, for the fused graph: GQA
        continues a cache with more than one token only in batch 1) runs as chunks of prompt_chunk
        tokens, each continuing the cache: the same logits bit for bit on the CPU, and much less
        attention work (GroupQueryAttention's prompt kernel scores every pair of positions, a chunk
        scores only its own rows against what came before): SmolLM2 fp32 reads 2048 tokens in
        0.61-0.78x the time and 512 in 0.84-0.88x with chunks of 256 (BENCHMARKS.md).
        """
        (b, s), chunk = input_ids.shape, self.prompt_chunk
        # GroupQueryAttention continues a cache with S > 1 only in batch 1
        if chunk and s > chunk and (b == 1 or not self.fused) and bool(np.all(new_mask)):
            parts = [self.step(input_ids[:, a:a + chunk], new_mask[:, a:a + chunk], cache, all_logits)
                     for a in range(0, s, chunk)]
            return np.concatenate(parts, axis=1) if all_logits else parts[-1]
        if self.fused:
            return self._step_fused(input_ids, new_mask, cache, all_logits)
        b, s = input_ids.shape
        mask = np.concatenate([cache.attention_mask, new_mask.astype(np.int64)], axis=1)  # (B, P+S)
        pos = cache.next_pos[:, None] + np.cumsum(new_mask, axis=1, dtype=np.int64) - 1  # (B, S)
        pos = np.maximum(pos, 0)
        feeds = {contract.INPUT_IDS: np.ascontiguousarray(input_ids, np.int64),
                 contract.ATTENTION_MASK: mask, contract.POSITION_IDS: pos, **self._keep_feed(all_logits, s)}
        if self.io_binding:
            logits = self._run_bound(feeds, cache)
        else:
            feeds.update(zip(self._past_names, cache.past))
            logits, *cache.past = self.session.run(None, feeds)
        cache.attention_mask = mask
        cache.next_pos = cache.next_pos + new_mask.sum(axis=1)
        cache.length += s
        if all_logits:
            return _every_position(logits, s)
        return np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)

    def _keep_feed(self, all_logits: bool, s: int) -> dict:
        """logits_to_keep for a step of s tokens: every position (the graph's default) or the last one.
        A one-token step feeds nothing: either gives [B, 1, V] (and a bound step keeps the last value)."""
        return {contract.LOGITS_TO_KEEP: logits_to_keep(all_logits)} if self.keeps_logits and s > 1 else {}

    def _run_bound(self, feeds: dict, cache: KVCache) -> np.ndarray:
        binding = self.session.io_binding()
        self._bind_feeds(binding, feeds)
        dev, dev_id = self.provider.device, self.device_id
        for name, value in zip(self._past_names, cache.past):
            binding.bind_ortvalue_input(name, value)
        # logits come back to the host; presents stay where the session puts them
        binding.bind_output(contract.LOGITS, "cpu")
        for name in self._present_names:
            binding.bind_output(name, dev, dev_id)
        self.session.run_with_iobinding(binding)
        logits, *cache.past = binding.get_outputs()
        return logits.numpy()

    def _bind_feeds(self, binding, feeds: dict) -> None:
        """This step's NumPy inputs, copied to the device."""
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, self._to_device(value))

    # ---- the fused graph: shared buffers, right-aligned rows ---------------------------------
    def _step_fused(self, input_ids: np.ndarray, new_mask: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        b, s = input_ids.shape
        counts = new_mask.sum(axis=1).astype(np.int64)  # real tokens per row in this step
        padded = bool((counts != s).any())
        if padded and cache.length:
            raise ValueError("the fused graph takes padding only in the first step")
        if padded:  # left padding -> each row's tokens first
            order = np.argsort(new_mask == 0, axis=1, kind="stable")
            input_ids = np.take_along_axis(input_ids, order, axis=1)
        lengths = cache.next_pos + counts  # tokens per row after this step
        total = int(lengths.max()) if cache.length else s  # GroupQueryAttention: total == S marks the first prompt
        if total > cache.capacity:
            self._grow(cache, max(total, min(2 * cache.capacity, self.config.model.max_seq_len)))
        mask = (np.arange(total)[None, :] < lengths[:, None]).astype(np.int64)
        feeds = {contract.INPUT_IDS: np.ascontiguousarray(input_ids, np.int64), contract.ATTENTION_MASK: mask,
                 **self._keep_feed(all_logits, s)}
        if self.io_binding:
            logits = self._run_fused_bound(feeds, cache, s)
        else:
            feeds.update(zip(self._past_names, cache.past))
            logits, *cache.past = self.session.run(None, feeds)
        cache.next_pos = lengths
        cache.length += s
        if all_logits:  # back to the caller's left-padded layout: column order[b, k] got logits[b, k]
            every = _every_position(logits, s)
            if padded:
                np.put_along_axis(every, order[:, :, None], every.copy(), axis=1)
            return every
        # each row's last real token: the one position kept, or column counts - 1 of all of them
        last = logits[:, -1] if logits.shape[1] == 1 else logits[np.arange(b), counts - 1]
        return np.array(last, dtype=np.float32)  # a copy: a decode step's host buffer is reused

    def _run_fused_bound(self, feeds: dict, cache: KVCache, s: int) -> np.ndarray:
        """One run on the cache's own IOBinding: the KV buffers are bound once (as past input and
        present output alike); each step rebinds only its ids, its mask and the logits."""
        binding = cache.binding
        if binding is None:
            binding = cache.binding = self.session.io_binding()
            binding.bind_output(contract.LOGITS, "cpu")  # first: get_outputs()[0] below
            for past, present, buf in zip(self._past_names, self._present_names, cache.past):
                binding.bind_ortvalue_input(past, buf)
                binding.bind_ortvalue_output(present, buf)  # one buffer: written in place
        self._bind_feeds(binding, feeds)
        if s == 1:  # decode: logits land in a host array the cache keeps, no output objects per step
            if cache.step_logits is None:
                host = np.empty((cache.batch, 1, self.config.model.vocab_size), np.float32)
                cache.step_logits = (host, ort.OrtValue.ortvalue_from_numpy(host))
            binding.bind_ortvalue_output(contract.LOGITS, cache.step_logits[1])
            self.session.run_with_iobinding(binding)
            return cache.step_logits[0]
        binding.bind_output(contract.LOGITS, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _grow(self, cache: KVCache, capacity: int) -> None:
        if capacity > self.config.model.max_seq_len:
            raise ValueError(f"{capacity} tokens exceed the model's context of {self.config.model.max_seq_len}")
        bigger = []
        for buf in cache.past:
            old = buf.numpy() if self.io_binding else buf
            new = np.zeros(old.shape[:2] + (capacity,) + old.shape[3:], self._kv_dtype)
            new[:, :, : old.shape[2]] = old
            bigger.append(self._to_device(new) if self.io_binding else new)
        cache.past, cache.capacity, cache.binding = bigger, capacity, None


def _open(model_path: Path, p: Provider, threads: int | None, device_id: int,
          startup_cache: bool) -> tuple[ort.InferenceSession, str]:
    """A session on provider p, and how the start-up cache served it (session_cache.py): "hit" (opened
    from the cache), "written" (this start wrote it) or "off". A cache never costs a load: when it
    cannot be written, the folder is opened as it is."""
    opts = _options(p, threads)
    folder = model_path.parent
    data = session_cache.data_size(folder) if startup_cache and p.name == "cpu" else None
    if data is None or data > session_cache.MAX_DATA:
        p_opts = {"device_id": str(device_id)} if p.name in ("cuda", "dml") else {}
        return ort.InferenceSession(str(model_path), opts, providers=[(p.ort_name, p_opts)]), "off"
    cached = session_cache.lookup(folder, p.name)
    if cached is not None:
        try:  # already optimized: opening it is reading the weights, prepacked
            return ort.InferenceSession(str(cached), _options(p, threads, optimize=False), providers=[p.ort_name]), "hit"
        except Exception:  # unreadable: written again below
            pass
    saving = _options(p, threads)
    tmp = session_cache.saving(saving, folder, data)
    if tmp is not None:
        try:
            session = ort.InferenceSession(str(model_path), saving, providers=[p.ort_name])
        except Exception:  # perhaps only the writing failed (a full disk)
            session_cache.discard(tmp)
        else:
            session_cache.commit(tmp, folder, p.name)
            return session, "written"
    return ort.InferenceSession(str(model_path), opts, providers=[p.ort_name]), "off"


def _options(prov: Provider, threads: int | None, optimize: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                      else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if prov.name == "dml":  # DirectML's rules: no memory patterns, sequential execution
        opts.enable_mem_pattern = False
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def wrong_task(folder: Path, config: FolderConfig, task: str) -> str:
    """One line for a folder opened for the wrong task: a classifier given to generate, or the reverse."""
    if config.task == contract.TASK_CLASSIFICATION:
        return (f"{folder} is a text classifier (labels {', '.join(config.labels)[:80]}), not a text generator: "
                f"classify with it (`llama2-onnx classify {folder} --text ...` or runtime.Classifier)")
    return (f"{folder} is a text generator, not a text classifier: use generate/chat with it, or export a "
            "LlamaForSequenceClassification checkpoint to classify")


PROMPT_CHUNK = 256  # CPU: 2048 tokens of SmolLM2 in 3.1 s in chunks of 256, 3.7 s of 128 or 512, 5.0 s at once


_KEEP = {flag: np.array(contract.KEEP_ALL if flag else 1, np.int64) for flag in (True, False)}
for _value in _KEEP.values():
    _value.flags.writeable = False


def logits_to_keep(all_logits: bool) -> np.ndarray:
    """The logits_to_keep input (read-only, made once): every position (contract.KEEP_ALL), or the last one."""
    return _KEEP[bool(all_logits)]


def _every_position(logits: np.ndarray, s: int) -> np.ndarray:
    """A float32 copy of a step's logits [B, S, V], refused where the graph kept only the last position."""
    if logits.shape[1] != s:
        raise UserError(f"this model's graph returns logits for {logits.shape[1]} of the step's {s} positions; "
                        "prompt logprobs need every position (export it again)")
    return np.array(logits, dtype=np.float32)  # a copy: a decode step's host buffer is reused
