import json

import pytest

from glmserve.model.config import ConfigError, GlmConfig
from glmserve.model.size import model_size


def test_real_glm52_config_loads_and_derives(shared_dir):
    raw = json.loads((shared_dir / "data/glm5/config.json").read_text())
    config = GlmConfig.from_dict(raw)
    assert config.indexer_types == raw["indexer_types"]
    assert config.mlp_layer_types == raw["mlp_layer_types"]
    full = [i for i, t in enumerate(config.indexer_types) if t == "full"]
    assert full[:4] == [0, 1, 2, 6] and full[-1] == 74 and len(full) == 21
    assert config.num_nextn_predict_layers == 1 and config.rope_theta == 8e6
    assert config.rope_interleave and config.indexer_rope_interleave and config.index_share_for_mtp_iteration
    assert config.latent_dim == 576

    # the same schedule is derived from freq/offset when the explicit lists are absent
    derived = GlmConfig.from_dict({k: v for k, v in raw.items() if k not in ("indexer_types", "mlp_layer_types")})
    assert derived.indexer_types == config.indexer_types and derived.mlp_layer_types == config.mlp_layer_types


@pytest.mark.slow
def test_glm52_size_matches_published(shared_dir):
    size = model_size(GlmConfig.from_pretrained(shared_dir / "data/glm5/config.json"))
    for got, want in [(size.main, 743.4e9), (size.with_mtp, 753.3e9), (size.activated, 40.3e9)]:
        assert abs(got - want) / want < 0.005


def test_pattern_and_legacy_fields(shared_dir):
    raw = json.loads((shared_dir / "data/glm5/config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("indexer_types", "rope_parameters")}
    raw.update(num_hidden_layers=4, mlp_layer_types=None, index_topk_pattern="FSFS", rope_theta=5e5)
    config = GlmConfig.from_dict(raw)
    assert config.indexer_types == ["full", "shared", "full", "shared"] and config.rope_theta == 5e5


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_size": "wide"}, "hidden_size"),
        ({"index_topk": -1}, "index_topk"),
        ({"model_type": "llama"}, "model_type"),
        ({"indexer_types": ["shared"] * 78}, "indexer_types"),
        ({"topk_group": 4}, "topk_group"),
        ({"index_topk_pattern": "FXF", "indexer_types": None}, "index_topk_pattern"),
    ],
)
def test_invalid_config_names_the_field(shared_dir, change, field):
    raw = json.loads((shared_dir / "data/glm5/config.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=field):
        GlmConfig.from_dict(raw)


def test_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GlmConfig.from_pretrained(tmp_path)
    del_key = {"model_type": "glm_moe_dsa"}
    (tmp_path / "config.json").write_text(json.dumps(del_key))
    with pytest.raises(ConfigError, match="vocab_size"):
        GlmConfig.from_pretrained(tmp_path)
