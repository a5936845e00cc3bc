"""`GlmForCausalLM` as one rank of a tensor/expert-parallel replica holds it: the same modules and forward, with
split layers swapped in.

Attention: each rank owns num_attention_heads / tp heads (q_b_proj and kv_b_proj split by heads, o_proj split by
input and all-reduced); q_a/kv_a projections, their norms, the latent and the DSA indexer are replicated (the
indexer is small, and computing it whole keeps every rank's top-k identical). Dense MLPs are split by width, MoE
layers by expert, embedding and lm_head by vocabulary.
"""

from ..config import GlmConfig
from ..glm import GlmForCausalLM
from .comm import ParallelContext
from .layers import RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead
from .moe import ExpertParallelMoE


class ParallelGlmForCausalLM(GlmForCausalLM):
    """Build it on the meta device (the unsplit modules it replaces are made first) and fill it with
    `load_parallel_model`. `model(input_ids)` gives the full logits [B, T, vocab] on every rank; all ranks of the
    replica must call it together with the same ids."""

    def __init__(self, config: GlmConfig, ctx: ParallelContext):
        ctx.config.check_model(config)
        tp = ctx.tp.size
        # The stock modules built at this rank's share of heads and dense width already have the split shapes.
        super().__init__(
            config.model_copy(
                update={
                    "num_attention_heads": config.num_attention_heads // tp,
                    "intermediate_size": config.intermediate_size // tp,
                }
            )
        )
        self.config = config
        self.ctx = ctx
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.tp)
        self.lm_head = VocabParallelLMHead(config.hidden_size, config.vocab_size, ctx.tp)
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.o_proj = RowParallelLinear(attn.o_proj.in_features, config.hidden_size, config.attention_bias, ctx.tp)
            if config.is_moe_layer(layer.layer_idx):
                layer.mlp = ExpertParallelMoE(config, ctx)
            else:
                layer.mlp.down_proj = RowParallelLinear(
                    layer.mlp.down_proj.in_features, config.hidden_size, False, ctx.tp
                )
