"""Model definitions: the torch-free config, our PyTorch Llama decoder, checkpoint loaders.

Only ``config`` (and ``gguf_vocab``) may be imported without torch.
"""
