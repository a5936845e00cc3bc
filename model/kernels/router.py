"""The MoE router's selection in one kernel: sigmoid, correction bias, top-k, gathered and normalized weights.

`model/moe.py`'s Router does this in about ten launches (sigmoid, add, topk, gather, sum, add, div, mul, ...),
which at decode batch sizes cost more than the router's matmul. Group-limited routing (n_group > 1) stays in torch:
GLM-5 routes with one group.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every batch size
def _route_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    num_rows,
    num_experts,
    stride_l,
    scaling,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    experts = tl.arange(0, BLOCK_E)
    mask = row_mask[:, None] & (experts < num_experts)[None, :]
    logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_l + experts[None, :], mask=mask, other=0.0)
    scores = tl.sigmoid(logits)
    bias = tl.load(bias_ptr + experts, mask=experts < num_experts, other=0.0)
    choice = tl.where(mask, scores + bias[None, :], float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    weights = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(choice, axis=1)
        pick = tl.min(tl.where(choice == best[:, None], experts[None, :], BLOCK_E), axis=1)  # lowest id on ties
        chosen = experts[None, :] == pick[:, None]
        ids = tl.where(slots[None, :] == j, pick[:, None], ids)
        weights = tl.where(slots[None, :] == j, tl.sum(tl.where(chosen, scores, 0.0), axis=1)[:, None], weights)
        choice = tl.where(chosen, float("-inf"), choice)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    out = rows[:, None].to(tl.int64) * TOP_K + slots[None, :]
    out_mask = row_mask[:, None] & (slots < TOP_K)[None, :]
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=out_mask)
    tl.store(weights_ptr + out, weights * scaling, mask=out_mask)


def route_triton(
    logits: torch.Tensor, bias: torch.Tensor, top_k: int, normalize: bool, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 router logits [N, E] -> (expert ids [N, top_k] int64, fp32 weights [N, top_k]), as `Router.route`
    computes them with one group (ties go to the lower expert id)."""
    num_rows, num_experts = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1 and top_k <= num_experts
    ids = torch.empty(num_rows, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(num_rows, top_k, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return ids, weights
    block_e = triton.next_power_of_2(num_experts)
    block_r = max(1, min(16, 4096 // block_e))
    _route_kernel[(triton.cdiv(num_rows, block_r),)](
        logits, bias.float(), ids, weights, num_rows, num_experts, logits.stride(0), scaling,
        TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=block_e, NORMALIZE=normalize, BLOCK_R=block_r,
        num_warps=4,
    )  # fmt: skip
    return ids, weights
