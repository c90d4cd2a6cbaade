"""The CPU facts behind the engine's cache-sized logit blocks (``CPU_BLOCK_BYTES``, ``THIN_VALUES``).

Four measurements, one thread, float32, each the best of ``--repeats`` loops:

* ``products``: the logit product ``[rows, D + 2] @ [D + 2, keys]`` in GFLOP/s, for the
  demo's block shapes (k = 15 and k = 7: D + 2 = 227 and 51);
* ``passes``: the passes a tracked block pays after its product (clamp, exp, weighted sum,
  N_eff and entropy sums), in ns per logit, on a 16 MB block (2^22 logits, the old blocks)
  and on 1 MB blocks (2^18, ``CPU_BLOCK_BYTES``), with the weighted sum formed both ways:
  ``weights @ values`` and ``(values^T @ weights^T)^T``;
* ``exponentials``: ``exp_`` against ``exp2_`` per logit (the sweeps take logits in bits and exp2);
* ``bookkeeping``: what :meth:`SoftmaxMean._update_rows` costs per call beyond its passes
  (a 64 x 64 block, so the passes are negligible), with and without statistics.

    python benchmarks/bench_blocks.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from patchmosaic.engine import (
    SoftmaxMean,
    augment_keys,
    augment_queries,
    augment_values,
)


def best_of(fn, repeats: int, loops: int) -> float:
    """Best seconds per call of ``fn`` over ``repeats`` timed loops of ``loops`` calls (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def products(repeats: int) -> None:
    for d2, label in ((227, "k = 15"), (51, "k = 7")):
        for rows, keys in ((256, 16384), (256, 1024)):
            q, k = torch.randn(1, rows, d2), torch.randn(1, d2, keys)
            out = torch.empty(1, rows, keys)
            s = best_of(lambda q=q, k=k, out=out: torch.bmm(q, k, out=out), repeats, 5)
            print(f"products {label}: [{rows}, {d2}] @ [{d2}, {keys}]  {2 * rows * keys * d2 / s / 1e9:6.1f} GFLOP/s")


def tracked_passes(rows: int, keys: int, thin: bool, repeats: int) -> float:
    """Seconds per logit of the passes after a ``[rows, keys]`` block's product (statistics tracked)."""
    logits = torch.randn(1, rows, keys) * 5 - 10
    work, weights = torch.empty_like(logits), torch.empty_like(logits)
    values = torch.randn(1, keys * 2, 2)[:, :keys]  # a slice of a chunk's values, as in the engine
    values_t = values.transpose(1, 2).contiguous()
    acc, acc_t = torch.zeros(1, rows, 2), torch.zeros(1, 2, rows)

    def chain() -> None:
        w = torch.clamp(logits, min=-40, max=30, out=work)
        torch.exp(w, out=weights)
        if thin:
            acc_t.baddbmm_(values_t, weights.transpose(1, 2))
        else:
            acc.baddbmm_(weights, values)
        torch.linalg.vector_norm(weights, dim=-1).square()
        w.mul_(weights).sum(-1)

    return best_of(chain, repeats, max(1, 2**22 // (rows * keys))) / (rows * keys)


def passes(repeats: int) -> None:
    for rows, keys in ((256, 16384), (256, 1024)):
        for thin in (False, True):
            form = "(values^T @ weights^T)^T" if thin else "weights @ values        "
            print(f"passes {rows * keys * 4 / 2**20:4.0f} MB block [{rows}, {keys}], weighted sum as {form}: "
                  f"{tracked_passes(rows, keys, thin, repeats) * 1e9:5.2f} ns per logit")


def exponentials(repeats: int) -> None:
    """``exp_`` against ``exp2_`` in place on a 1 MB block of clamped shifted logits (the engine's sweeps
    use exp2 on logits in bits, ``engine.LOG2_E``); the copy that refreshes the block is subtracted."""
    logits = (torch.randn(256, 1024) * 20 - 30).clamp_(min=-80, max=60)
    block = torch.empty_like(logits)
    copy = best_of(lambda: block.copy_(logits), repeats, 20)
    for name, op in (("exp ", torch.Tensor.exp_), ("exp2", torch.Tensor.exp2_)):
        s = best_of(lambda op=op: op(block.copy_(logits)), repeats, 20) - copy
        print(f"exponentials: {name} in place on a 1 MB block: {s / logits.numel() * 1e9:5.2f} ns per logit")


def bookkeeping(repeats: int) -> None:
    for track in (None, 0):
        q, keys, vals = torch.randn(1, 64, 11), torch.randn(1, 11, 64), torch.randn(1, 64, 1)
        state = SoftmaxMean(augment_queries(q, torch.ones(64), -0.5 * torch.ones(64)), 1, track=track)
        kt, va = augment_keys(keys), augment_values(vals)
        state.update(kt, va)  # every row has a reference
        s = best_of(lambda state=state, kt=kt, va=va: state._update_rows(slice(0, 64), kt, va, None, None),
                    repeats, 500)
        print(f"bookkeeping: one 64 x 64 block, {'statistics' if track == 0 else 'mean only '}: {s * 1e6:6.1f} us per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, float32")
    products(args.repeats)
    passes(args.repeats)
    exponentials(args.repeats)
    bookkeeping(args.repeats)


if __name__ == "__main__":
    main()
