"""The runtime: ONNX Runtime inference over an exported model folder. Never imports torch.

    from llama2_onnx.runtime import Generator
    gen = Generator.from_dir("out/llama-2-7b-chat")        # provider="auto", io_binding=True
    print(gen.chat([{"role": "user", "content": "Hi!"}]).text)

    from llama2_onnx.runtime import Llama                  # Meta's interface (runtime/meta.py)
    Llama.build("out/llama-2-7b").text_completion(["I believe the meaning of life is"], logprobs=True)

    from llama2_onnx.runtime import Classifier             # a sequence classifier (runtime/classifier.py)
    Classifier.from_dir("out/llama-2-sentiment").classify(["I loved it."])   # [{"label", "score", "scores"}]
"""

import importlib

# name -> the module that defines it, imported on first use: `from llama2_onnx.runtime import contract`
# (or any one module) loads that module alone, not the generator, classifier, meta and session
_EXPORTS = {
    "CHAT_FORMATS": "chat_format", "format_dialog": "chat_format", "Classifier": "classifier",
    "FolderConfig": "folder", "ModelFolderError": "manifest", "GenerationResult": "generator", "Generator": "generator",
    "TextStream": "generator", "Timings": "generator", "Llama": "meta", "SamplingParams": "sampler", "sample": "sampler",
    "KVCache": "session", "Model": "session", "StreamDecoder": "tokenizer", "load_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
