"""Compiled layers are kept on the data volume, one folder per torch, GPU and model config
(worker.training.compile_cache): what a compile writes lands there, and another base gets a
folder of its own."""

from __future__ import annotations

import pytest
import torch
from transformers import PhiConfig

from worker.training.compile_cache import cache_key, use_compile_cache


def test_the_key_follows_the_model_config_not_its_name():
    config = PhiConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    renamed = PhiConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    renamed._name_or_path = "/somewhere/else/phi-copy"
    wider = PhiConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    assert cache_key(config) == cache_key(renamed)
    assert cache_key(config) != cache_key(wider)
    assert cache_key(config).startswith(f"torch-{torch.__version__}-cpu-phi-".replace("+", "_"))


@pytest.mark.slow
def test_a_compile_after_it_writes_into_the_data_volume(tmp_path, monkeypatch):
    # restored after the test: the next compiles in this process go back where they went
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere" / "triton"))
    config = PhiConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    folder = use_compile_cache(tmp_path / "compile-cache", config)
    assert folder.parent == tmp_path / "compile-cache" and folder.name == cache_key(config)

    def layer(x, w):
        return torch.nn.functional.gelu(x @ w) * 2

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=True):
        compiled = torch.compile(layer, backend="inductor")
        x, w = torch.randn(8, 16), torch.randn(16, 16)
        torch.testing.assert_close(compiled(x, w), layer(x, w))
    torch._dynamo.reset()
    assert any((folder / "fxgraph").rglob("*")), "the FX graph cache wrote nothing to the data volume"
    assert not (tmp_path / "elsewhere").exists()
