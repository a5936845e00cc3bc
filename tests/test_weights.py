import json

import pytest
import torch
from hf_models import make_hf_model
from safetensors.torch import load_file, save_file

from glmserve.model import CheckpointError, load_model
from glmserve.model.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_hf_model(path, seed=3)
    return path


def _copy_with(tmp_path, checkpoint, tensors):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_tensor_is_named(tmp_path, checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.2.self_attn.indexer.wk.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.2\.self_attn\.indexer\.wk\.weight"):
        load_model(_copy_with(tmp_path, checkpoint, tensors))


def test_unexpected_tensor_is_named(tmp_path, checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.9.mlp.gate.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.9\.mlp\.gate\.weight"):
        load_model(_copy_with(tmp_path, checkpoint, tensors))


def test_shape_mismatch_is_named(tmp_path, checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight has shape \(5, 64\)"):
        load_model(_copy_with(tmp_path, checkpoint, tensors))


def test_sharded_checkpoint_loads(tmp_path, checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    ids = torch.randint(0, 160, (1, 20))
    # equal weights; only memory alignment differs, which may change the BLAS path in the last bits
    torch.testing.assert_close(load_model(tmp_path)(ids), load_model(checkpoint)(ids), rtol=1e-5, atol=1e-5)


def test_fp8_roundtrip_blocks():
    w = torch.randn(300, 200)
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    back = dequantize_fp8_blockwise(q, s, torch.float32)
    assert ((back - w).abs() <= w.abs() * 0.07 + 1e-3).all()  # e4m3 keeps 3 mantissa bits


def test_fp8_checkpoint_matches_dequantized_reference(tmp_path, checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    fp8, dequantized = {}, {}
    for name, t in tensors.items():
        kept = ("embed_tokens", "mlp.gate.", "weights_proj")  # stay bf16 in real FP8 checkpoints
        quantizable = t.ndim == 2 and not any(k in name for k in kept)
        if quantizable and name.endswith(".weight"):
            q, s = quantize_fp8_blockwise(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dequantized[name] = dequantize_fp8_blockwise(q, s, torch.float32)
        else:
            fp8[name] = dequantized[name] = t
    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    fp8_dir.mkdir(), ref_dir.mkdir()
    _copy_with(fp8_dir, checkpoint, fp8)
    _copy_with(ref_dir, checkpoint, dequantized)
    ids = torch.randint(0, 160, (2, 24))
    torch.testing.assert_close(load_model(fp8_dir)(ids), load_model(ref_dir)(ids), rtol=1e-5, atol=1e-5)


def test_default_checkpoint_is_deterministic_and_loads():
    model = load_model()
    again = load_model()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits = model(ids)
    assert logits.shape == (1, 5, model.config.vocab_size) and torch.equal(logits, again(ids))
    assert model.mtp is not None
