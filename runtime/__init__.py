"""The runtime: ONNX Runtime inference over an exported model folder. Never imports torch.

    from llama2_onnx.runtime import Generator
    gen = Generator.from_dir("out/llama-2-7b-chat")        # provider="auto", io_binding=True
    print(gen.chat([{"role": "user", "content": "Hi!"}]).text)

    from llama2_onnx.runtime import Llama                  # Meta's interface (runtime/meta.py)
    Llama.build("out/llama-2-7b").text_completion(["I believe the meaning of life is"], logprobs=True)

    from llama2_onnx.runtime import Classifier             # a sequence classifier (runtime/classifier.py)
    Classifier.from_dir("out/llama-2-sentiment").classify(["I loved it."])   # [{"label", "score", "scores"}]
"""

from .chat_format import CHAT_FORMATS, format_dialog
from .classifier import Classifier
from .folder import FolderConfig, ModelFolderError
from .generator import GenerationResult, Generator, TextStream, Timings
from .meta import Llama
from .sampler import SamplingParams, sample
from .session import KVCache, Model
from .tokenizer import StreamDecoder, load_tokenizer

__all__ = [
    "CHAT_FORMATS", "Classifier", "FolderConfig", "GenerationResult", "Generator", "KVCache", "Llama", "Model", "ModelFolderError",
    "SamplingParams", "StreamDecoder", "TextStream", "Timings", "format_dialog", "load_tokenizer", "sample",
]
