"""Permutation-order attention on CPU: the C++ kernel vs SDPA with a dense mask vs FlexAttention.

Cases (fp32, B8 H12 D64, L = 256 and 1024):
- ``perm_attention_fwd_bwd``: forward + backward (dq, dk, dv) of ``cpp`` (csrc/perm_attention.cpp,
  mask from kind/step on the fly, dead tiles skipped) and ``sdpa_dense_mask``
  (``F.scaled_dot_product_attention`` with the [B, 1, L, L] bool mask from ``permutation_mask``, built
  once outside the timed region -- the "built once per batch, shared by all layers" setting; PyTorch
  runs its fused flash-attention CPU kernel on it). At L = 256 also the eager fp32 ``reference``.
- ``perm_attention_fwd``: forward only, the same two plus ``flex_compiled``
  (``torch.compile(flex_attention)`` with a BlockMask built once from the same rule; FlexAttention
  has no CPU backward).
- Mask memory per provider (bytes; formulas below) and tile-skip fractions: the Triton kernel's
  (64 x 64 tiles) for a left-to-right order at L = 1024 and for the C-Mask layout, and the C++
  kernel's with its own default tiles.

Layout (``cmask_layout``), C-Mask-like: 197 image tokens (ViT-B/16 at 224 px: 196 patches + CLS) as
CONTEXT, then T text tokens of which half are masked in spans (lengths Geometric(1/3) on 1, 2, ..., mean 3)
kept in place as ORIGINAL, then one PSEUDO token per masked token appended at the end with its span's
step; the spans' factorization order is a uniformly random permutation; no padding. T = 39 (20
masked) at L = 256 and T = 551 (276 masked) at L = 1024.

Run from the repository root (each length separately keeps a run under ~3 minutes here)::

    python -m bench.bench_perm_attention --length 256
    python -m bench.bench_perm_attention --length 1024 --reps 3
"""
import argparse

import torch
import torch.nn.functional as F

from bench.harness import machine, run_cases, save_rows
from fastvl_kernels._cpp import cpp_op
from fastvl_kernels.perm_attention import (
    CONTEXT,
    ORIGINAL,
    PSEUDO,
    encode_rule,
    permutation_attention,
    permutation_attention_reference,
    permutation_mask,
    permutation_tile_skip_fraction,
)

N_IMAGE = 197


def cmask_layout(batch: int, seq_len: int, n_image: int = N_IMAGE, mask_ratio: float = 0.5,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """kind, step [B, L] of the C-Mask-like layout described in the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    n_text = round((seq_len - n_image) / (1 + mask_ratio))
    n_mask = seq_len - n_image - n_text
    assert 0 < n_mask <= n_text, "sequence too short for the layout"
    kind = torch.full((batch, seq_len), CONTEXT, dtype=torch.long)
    step = torch.zeros(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        masked = torch.zeros(n_text, dtype=torch.bool)
        spans = []
        while int(masked.sum()) < n_mask:
            free = (~masked).nonzero().squeeze(1)
            pos = int(free[torch.randint(len(free), (1,), generator=gen)])
            length = int(torch.empty(1).geometric_(1 / 3, generator=gen).item())  # 1, 2, ...; mean 3
            span = []
            while pos < n_text and not masked[pos] and len(span) < length and int(masked.sum()) < n_mask:
                masked[pos] = True
                span.append(pos)
                pos += 1
            spans.append(span)
        order = (torch.randperm(len(spans), generator=gen) + 1).tolist()
        slot = n_image + n_text
        for span, s in zip(sorted(spans), order):
            for p in span:
                kind[b, n_image + p], step[b, n_image + p] = ORIGINAL, s
                kind[b, slot], step[b, slot] = PSEUDO, s
                slot += 1
    return kind, step


def mask_memory(batch: int, seq_len: int, flex_block_mask=None) -> dict:
    """Bytes each provider holds for the mask.

    cpp: four int32 codes per token plus min/max summaries per tile block (O(B L)); kind/step are the
    caller's. sdpa_dense_mask: the bool [B, 1, L, L] mask plus the float32 additive copy SDPA makes of
    it for the CPU flash kernel (5 B L^2). flex_compiled: the BlockMask index tensors plus the four
    int32 codes its mask_mod reads."""
    padded = -(-seq_len // 256) * 256  # the C++ kernel pads the codes to whole tiles
    codes = 4 * 4 * batch * padded
    summaries = 4 * 4 * batch * (padded // 128 + padded // 256)  # forward tiles 128 x 256
    rows = {"cpp": codes + summaries, "sdpa_dense_mask": batch * seq_len * seq_len * (1 + 4)}
    if flex_block_mask is not None:
        names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
        block_bytes = sum(getattr(flex_block_mask, n).nbytes for n in names
                          if getattr(flex_block_mask, n, None) is not None)
        rows["flex_compiled"] = block_bytes + 4 * 4 * batch * seq_len
    return rows


def make_flex(kind, step, batch, seq_len):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rule = encode_rule(kind, step)

    def mask_mod(b, h, q_idx, kv_idx):  # the kernels' rule, attention-gym style
        return rule.visible(b, q_idx, kv_idx)

    block_mask = create_block_mask(mask_mod, batch, None, seq_len, seq_len, device="cpu")
    return torch.compile(flex_attention), block_mask


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=None, help="default 10 (L <= 512) or 3")
    parser.add_argument("--no-flex", action="store_true")
    args = parser.parse_args(argv)
    batch, heads, seq_len, head_dim = args.batch, args.heads, args.length, args.head_dim
    reps = args.reps or (10 if seq_len <= 512 else 3)
    warmup = 2 if reps >= 5 else 1
    shape = f"B{batch} H{heads} L{seq_len} D{head_dim} cmask-layout"
    print(f"# {shape}, fp32, {machine()}, reps {reps}, warmup {warmup}")
    if cpp_op("permutation_attention_fwd") is None:
        raise SystemExit("the C++ extension is not built: pip install --no-build-isolation -e .")

    torch.manual_seed(0)
    kind, step = cmask_layout(batch, seq_len)
    q, k, v = [torch.randn(batch, heads, seq_len, head_dim, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(batch, heads, seq_len, head_dim)
    dense_mask = permutation_mask(kind, step)[:, None]  # built once per batch, outside the timing

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), grad_out)

    cases = {
        "cpp": fwd_bwd(lambda: permutation_attention(q, k, v, kind, step, impl="cpp")),
        "sdpa_dense_mask": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)),
    }
    if seq_len <= 512:
        cases["reference"] = fwd_bwd(lambda: permutation_attention_reference(q, k, v, kind, step))
    run_cases("perm_attention_fwd_bwd", shape, cases, baseline="sdpa_dense_mask", reps=reps, warmup=warmup)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    qd, kd, vd = q.detach(), k.detach(), v.detach()  # FlexAttention on CPU refuses inputs requiring grad
    fwd_cases = {
        "cpp": no_grad(lambda: permutation_attention(qd, kd, vd, kind, step, impl="cpp")),
        "sdpa_dense_mask": no_grad(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dense_mask)),
    }
    block_mask = None
    if not args.no_flex:
        flex, block_mask = make_flex(kind, step, batch, seq_len)
        fwd_cases["flex_compiled"] = no_grad(lambda: flex(qd, kd, vd, block_mask=block_mask))
        fwd_cases["flex_compiled"]()  # compile outside the timing
    run_cases("perm_attention_fwd", shape, fwd_cases, baseline="sdpa_dense_mask", reps=reps, warmup=warmup)

    # Mask memory and tile skipping.
    memory = mask_memory(batch, seq_len, block_mask)
    rows = [{"op": "perm_attention_mask_bytes", "provider": p, "shape": shape, "machine": machine(),
             "mask_bytes": n} for p, n in memory.items()]
    left_to_right = (torch.full((1, seq_len), ORIGINAL), torch.arange(1, seq_len + 1)[None])
    skips = {
        "triton 64x64, left-to-right": permutation_tile_skip_fraction(*left_to_right, block_m=64, block_n=64),
        "triton 64x64, cmask layout": permutation_tile_skip_fraction(kind, step, block_m=64, block_n=64),
        "cpp fwd 128x256, cmask layout": permutation_tile_skip_fraction(kind, step, block_m=128, block_n=256),
        "cpp bwd 128x128, cmask layout": permutation_tile_skip_fraction(kind, step, block_m=128, block_n=128),
    }
    rows += [{"op": "perm_attention_tile_skip", "provider": p, "shape": shape, "machine": machine(),
              "skip_fraction": round(f, 4)} for p, f in skips.items()]
    print()
    print_table_generic(rows)
    save_rows("perm_attention", rows)


def print_table_generic(rows) -> None:
    cols = ["op", "provider", "shape", "mask_bytes", "skip_fraction"]
    table = [cols] + [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


if __name__ == "__main__":
    main()
