"""One check of fastvl on one NVIDIA GPU, printing one table (meant to finish in under 10 minutes).

    python -m bench.gpu_check                          # every section
    python -m bench.gpu_check --only kernels bench     # some sections
    python -m bench.gpu_check --only train --steps 30 --out /tmp/fastvl-gpu-check

Sections, in this order; every row is ``name | status | seconds | detail`` with status ``pass``,
``FAIL`` or ``skip`` (the detail says why):

kernels  each fused op on CUDA (Triton, ``impl="triton"``) against its PyTorch reference in fp32, fp16
         and bf16: ``permutation_attention`` output and dq/dk/dv (C-Mask layout, padded rows),
         ``value_weighted_topk_reward``, ``sample_spans`` (the quota and span invariants; log-prob and
         entropy against ``span_action_log_prob``), and the ``flex`` attention backend (compiled
         FlexAttention, forward and backward) against ``eager`` on the same kind/step + padding masks.
         Errors are max |got - reference| / max(1, max |reference|) against ``TOLERANCE[dtype]``.
bench    each kernel's speed against its PyTorch baseline at the shapes of bench/bench_*.py, timed in
         interleaved rounds with CUDA events after a synchronisation (``harness.time_interleaved``):
         permutation attention forward + backward vs SDPA with the dense mask, the reward vs its
         reference, span sampling vs its reference. Measurements: they pass unless they error.
dali     DALI's ``mixed`` decoder (nvJPEG) against Pillow on JPEGs of the built-in shards: mean
         absolute difference on the uint8 scale at most ``DALI_MAX_MEAN_DIFF``.
train    albef, maskvlm, mamo, cmask and epic (configs/tiny_*.json) for ``--steps`` steps each in fp16
         and bf16, each ``python -m fastvl.cli train`` (DeepSpeed) in its own process on the built-in
         data: every logged loss finite, the mean loss of the last quarter of the steps below the first
         quarter's, and in fp16 a loss scale still >= ``MIN_LOSS_SCALE``. EPIC's saliency teacher is
         the albef run of the same precision.
overlap  C-Mask's step time with its masking agent (PPO update on a side stream) against the same
         recipe with random masks (no agent): ``bench.bench_train_step`` in its own process, ``--steps``
         interleaved rounds.

The built-in data is ``--data`` (default data/synth) when it holds train/ and heldout/ shards, else a
small set generated under ``--out``. Exit status: 0 when no row fails, 1 when one does, 2 without
CUDA (then nothing is run).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
DEVICE = torch.device("cuda")  # of every check in this process (the runs in subprocesses pick it themselves)
SECTION_ORDER = ("kernels", "bench", "dali", "train", "overlap")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
METHODS = ("albef", "maskvlm", "mamo", "cmask", "epic")  # albef first: it is epic's teacher
TRAIN_PRECISIONS = ("fp16", "bf16")
MIN_LOSS_SCALE = 2.0 ** 6  # fp16 starts at 2^16: ten halvings within a short run means most steps overflowed
DALI_MAX_MEAN_DIFF = 1.0  # uint8 levels; DALI's CPU decoder is held to 0.5 in tests/data/test_dali.py
PROCESS_TIMEOUT_S = 600


# --------------------------------------------------------------------------------------------------
# Rows and the table
# --------------------------------------------------------------------------------------------------
class Skip(Exception):
    """A row that cannot run here (the message says why)."""


class Failed(Exception):
    """A row whose check failed (the message holds the numbers)."""


@dataclass
class Row:
    name: str
    status: str  # "pass" | "FAIL" | "skip"
    detail: str = ""
    seconds: float = 0.0


def run_row(name: str, check: Callable[[], str]) -> Row:
    """Run one check: its return value is the detail of a passing row; ``Skip`` / ``Failed`` give those
    statuses, any other exception a FAIL naming it. The row is printed as it finishes (progress)."""
    started = time.perf_counter()
    try:
        status, detail = "pass", check()
    except Skip as reason:
        status, detail = "skip", str(reason)
    except Failed as reason:
        status, detail = "FAIL", str(reason)
    except Exception as error:  # a check that crashes is a failed row, and the check goes on
        message = str(error).strip().splitlines()
        status, detail = "FAIL", f"{type(error).__name__}: {message[0] if message else ''}"
    row = Row(name, status, detail, time.perf_counter() - started)
    print(f"[{row.status}] {row.name} ({row.seconds:.1f} s)", flush=True)
    return row


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table, then a count per status."""
    lines = [("check", "status", "s", "detail")]
    lines += [(r.name, r.status, f"{r.seconds:.1f}", r.detail) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line[:3], widths)) + "  " + line[3] for line in lines]
    counts = {status: sum(r.status == status for r in rows) for status in ("pass", "FAIL", "skip")}
    text.append(", ".join(f"{n} {status}" for status, n in counts.items()))
    return "\n".join(line.rstrip() for line in text)


def exit_status(rows: list[Row]) -> int:
    return 1 if any(r.status == "FAIL" for r in rows) else 0


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------
class Context:
    """The parsed arguments, plus the built-in data, prepared on first use."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._data: Path | None = None

    def data(self) -> Path:
        """A folder with train/ and heldout/ shards: ``--data``, else generated under ``--out``."""
        if self._data is None:
            given = Path(self.args.data)
            if (given / "train").is_dir() and (given / "heldout").is_dir():
                self._data = given
            else:
                from fastvl.data.synthetic import generate

                self._data = Path(self.args.out) / "synth"
                if not (self._data / "heldout").is_dir():
                    generate(self._data, train=640, heldout=64, seed=0, shard_size=160, progress=False)
        return self._data


def relative_errors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], tolerance: float) -> str:
    """Per name, max |got - want| / max(1, max |want|); raises ``Failed`` when one is above
    ``tolerance`` or not finite, else returns the errors as a detail string."""
    errors = {}
    for name, (got, want) in pairs.items():
        got, want = got.detach().float(), want.detach().float()
        errors[name] = ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
    detail = " ".join(f"{name} {error:.1e}" for name, error in errors.items()) + f" (tol {tolerance:.0e})"
    if any(not math.isfinite(e) or e > tolerance for e in errors.values()):
        raise Failed("max rel err " + detail)
    return "max rel err " + detail


def run_process(command: list[str], timeout: float = PROCESS_TIMEOUT_S) -> str:
    """Run ``command`` from the repository root; its stdout, or ``Failed`` with its last stderr line."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["(no stderr)"]
        raise Failed(f"exit {done.returncode}: {last[0][:200]}")
    return done.stdout


def perm_attention_case(batch: int, length: int, dtype: torch.dtype, n_image: int):
    """q, k, v [B, 12, L, 64] (requiring grad), kind, step and a key padding mask on CUDA, in the
    C-Mask layout of bench/bench_perm_attention.py; the last row padded over its final quarter."""
    from bench.bench_perm_attention import cmask_layout

    kind, step = cmask_layout(batch, length, n_image=n_image)
    real = torch.ones(batch, length, dtype=torch.bool)
    real[-1, length - length // 4:] = False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, 12, length, 64, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    return q, k, v, kind.to(DEVICE), step.to(DEVICE), real.to(DEVICE)


# --------------------------------------------------------------------------------------------------
# kernels: each op on CUDA against its reference
# --------------------------------------------------------------------------------------------------
def check_perm_attention(dtype: torch.dtype) -> str:
    from fastvl_kernels import permutation_attention, permutation_attention_reference

    q, k, v, kind, step, real = perm_attention_case(2, 256, dtype, n_image=64)
    grad_out = torch.randn_like(q)
    got = permutation_attention(q, k, v, kind, step, real, impl="triton")
    want = permutation_attention_reference(q, k, v, kind, step, real)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    pairs = {"out": (got, want), **{name: pair for name, pair in zip(("dq", "dk", "dv"), zip(got_grads, want_grads))}}
    return relative_errors(pairs, TOLERANCE[dtype])


def check_flex_backend(dtype: torch.dtype) -> str:
    from fastvl.models.attention import attention

    q, k, v, kind, step, real = perm_attention_case(2, 256, dtype, n_image=64)
    masks = {"kind": kind, "step": step, "key_padding_mask": real}
    grad_out = torch.randn_like(q)
    got = attention(q, k, v, backend="flex", **masks)
    want = attention(q, k, v, backend="eager", **masks)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    pairs = {"out": (got, want), **{name: pair for name, pair in zip(("dq", "dk", "dv"), zip(got_grads, want_grads))}}
    return relative_errors(pairs, TOLERANCE[dtype])


def check_reward(dtype: torch.dtype) -> str:
    from bench.bench_reward import make_case
    from fastvl_kernels import value_weighted_topk_reward, value_weighted_topk_reward_reference

    x = {name: t.to(DEVICE) for name, t in make_case(B=4, dtype=dtype).items()}
    got = value_weighted_topk_reward(**x, impl="triton")
    return relative_errors({"reward": (got, value_weighted_topk_reward_reference(**x))}, TOLERANCE[dtype])


def check_span_sampling(dtype: torch.dtype) -> str:
    from bench.bench_span_sampling import make_case
    from fastvl_kernels import sample_spans
    from fastvl_kernels.span_sampling import quota_counts, span_action_log_prob

    p, s, g, lengths = (t.to(DEVICE) for t in make_case(64, 40))
    p, s, g = p.to(dtype), s.to(dtype), g.to(dtype)
    sample = sample_spans(p, s, lengths, 0.5, 1, order_scores=g, impl="triton")
    beyond = torch.arange(40, device=DEVICE)[None, :] >= lengths[:, None]
    if not torch.equal(sample.mask.sum(1), quota_counts(lengths, 0.5, 40)):
        raise Failed("the masked count per row is not the quota")
    if not (torch.equal(sample.mask, sample.span_id > 0) and torch.equal(sample.mask, sample.step > 0)):
        raise Failed("mask, span_id > 0 and step > 0 disagree")
    if bool((sample.mask & beyond).any()):
        raise Failed("a token past a row's length is masked")
    log_prob, entropy = span_action_log_prob(p, s, lengths, 0.5, sample, order_scores=g)
    return "invariants ok; " + relative_errors({"log_prob": (sample.log_prob, log_prob),
                                                "entropy": (sample.entropy, entropy)}, 1e-4)


def kernel_rows(ctx: Context) -> list[Row]:
    checks = {"permutation_attention triton": check_perm_attention, "attention backend flex": check_flex_backend,
              "value_weighted_topk_reward triton": check_reward, "sample_spans triton": check_span_sampling}
    return [run_row(f"kernels: {name} {label}", lambda check=check, dtype=dtype: check(dtype))
            for name, check in checks.items() for label, dtype in DTYPES.items()]


# --------------------------------------------------------------------------------------------------
# bench: each kernel against its PyTorch baseline
# --------------------------------------------------------------------------------------------------
def speedup(cases: dict[str, Callable[[], object]], reps: int = 10) -> str:
    """Time ``cases`` (baseline first, then the kernel) in interleaved rounds; the kernel's speedup."""
    from bench.harness import time_interleaved

    baseline, kernel = cases
    timing = time_interleaved(cases, warmup=3, reps=reps)
    ratio = timing[kernel]
    return (f"{kernel} {ratio['ms']:.2f} ms vs {baseline} {timing[baseline]['ms']:.2f} ms: "
            f"{1 / ratio['ratio']:.2f}x faster (rounds {1 / ratio['ratio_p80']:.2f}-{1 / ratio['ratio_p20']:.2f}x)")


def bench_perm_attention(dtype: torch.dtype) -> str:
    import torch.nn.functional as F

    from fastvl_kernels import permutation_attention, permutation_mask

    q, k, v, kind, step, real = perm_attention_case(8, 1024, dtype, n_image=197)
    dense = (permutation_mask(kind, step) & real[:, None, :])[:, None]  # built once, outside the timing
    grad_out = torch.randn_like(q)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), grad_out)

    return speedup({"sdpa_dense_mask": fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
                    "triton": fwd_bwd(lambda: permutation_attention(q, k, v, kind, step, real, impl="triton"))})


def bench_reward(dtype: torch.dtype) -> str:
    from bench.bench_reward import make_case
    from fastvl_kernels import value_weighted_topk_reward, value_weighted_topk_reward_reference

    x = {name: t.to(DEVICE) for name, t in make_case(dtype=dtype).items()}
    return speedup({"reference": lambda: value_weighted_topk_reward_reference(**x),
                    "triton": lambda: value_weighted_topk_reward(**x, impl="triton")})


def bench_span_sampling() -> str:
    from bench.bench_span_sampling import make_case
    from fastvl_kernels import sample_spans

    p, s, g, lengths = (t.to(DEVICE) for t in make_case(256, 40))
    return speedup({impl: (lambda impl=impl: sample_spans(p, s, lengths, 0.5, 1, order_scores=g, impl=impl))
                    for impl in ("reference", "triton")}, reps=5)


def bench_rows(ctx: Context) -> list[Row]:
    rows = [run_row(f"bench: permutation_attention fwd+bwd B8 H12 L1024 D64 {label}",
                    lambda dtype=dtype: bench_perm_attention(dtype)) for label, dtype in DTYPES.items()]
    rows += [run_row(f"bench: value_weighted_topk_reward B32 H12 T40 I197 {label}",
                     lambda dtype=dtype: bench_reward(dtype)) for label, dtype in DTYPES.items()]
    rows.append(run_row("bench: sample_spans B256 L40 (fp32 probabilities)", bench_span_sampling))
    return rows


# --------------------------------------------------------------------------------------------------
# dali: the GPU decoder against Pillow
# --------------------------------------------------------------------------------------------------
def shard_jpegs(folder: Path, count: int) -> list[bytes]:
    """The first ``count`` JPEGs of the shards in ``folder``."""
    found = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg") and len(found) < count:
                    found.append(tar.extractfile(member).read())
        if len(found) == count:
            break
    return found


def check_dali(ctx: Context) -> str:
    import numpy as np

    from fastvl.data.dali import dali_import_error, decode_images
    from fastvl.data.images import decode_rgb

    if dali_import_error() is not None:
        raise Skip(f"DALI does not import ({dali_import_error()})")
    encoded = shard_jpegs(ctx.data() / "train", 32)
    decoded = decode_images(encoded, device_id=torch.cuda.current_device())  # device="mixed": nvJPEG
    differences = [np.abs(d.astype(np.int32) - decode_rgb(e).permute(1, 2, 0).numpy().astype(np.int32))
                   for d, e in zip(decoded, encoded)]
    mean = float(np.mean([d.mean() for d in differences]))
    detail = f"{len(encoded)} JPEGs: mean |dali - pillow| {mean:.3f}, max {max(int(d.max()) for d in differences)}"
    if mean > DALI_MAX_MEAN_DIFF:
        raise Failed(f"{detail} (limit {DALI_MAX_MEAN_DIFF})")
    return detail


def dali_rows(ctx: Context) -> list[Row]:
    return [run_row("dali: mixed decoder vs Pillow on the built-in shards", lambda: check_dali(ctx))]


# --------------------------------------------------------------------------------------------------
# train: every method, a short run per precision
# --------------------------------------------------------------------------------------------------
def judge_training(metrics: list[dict], precision: str) -> str:
    """The verdict on a run's metrics rows (one per step): losses finite and falling (mean of the last
    quarter below the first quarter's), and in fp16 a loss scale that did not collapse."""
    losses = [row["loss"] for row in metrics]
    if len(losses) < 4:
        raise Failed(f"only {len(losses)} metrics rows")
    if not all(math.isfinite(x) for x in losses):
        raise Failed(f"non-finite loss at step {next(r['step'] for r in metrics if not math.isfinite(r['loss']))}")
    quarter = len(losses) // 4
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    detail = f"loss {first:.3f} -> {last:.3f} ({len(losses)} steps)"
    if precision == "fp16":
        scale = metrics[-1].get("loss_scale")
        detail += f", loss scale {scale:g}"
        if scale is None or scale < MIN_LOSS_SCALE:
            raise Failed(f"{detail}: loss scale collapsed (< {MIN_LOSS_SCALE:g})")
    if not last < first:
        raise Failed(f"{detail}: not falling")
    return detail


def train_method(ctx: Context, method: str, precision: str) -> str:
    out = Path(ctx.args.out) / "train" / f"{method}-{precision}"
    data = ctx.data()
    overrides = [f"data.train={data / 'train'}", f"data.eval={data / 'heldout'}", f"train.output_dir={out}",
                 f"train.steps={ctx.args.steps}", f"train.precision={precision}", "train.warmup_steps=2",
                 "train.log_every=1", "train.save_every=0", "train.resume=false"]
    if method == "epic":
        teacher = Path(ctx.args.out) / "train" / f"albef-{precision}"
        if not (teacher / "metrics.jsonl").exists():
            raise Skip(f"its saliency teacher is the albef {precision} run, which did not run")
        overrides.append(f"method.options.teacher={teacher}")
    run_process([sys.executable, "-m", "fastvl.cli", "train", "--config", f"configs/tiny_{method}.json",
                 "--set", *overrides])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return judge_training(metrics, precision)


def train_rows(ctx: Context) -> list[Row]:
    return [run_row(f"train: {method} {precision} {ctx.args.steps} steps",
                    lambda method=method, precision=precision: train_method(ctx, method, precision))
            for precision in TRAIN_PRECISIONS for method in METHODS]


# --------------------------------------------------------------------------------------------------
# overlap: C-Mask with and without its agent
# --------------------------------------------------------------------------------------------------
def check_overlap(ctx: Context) -> str:
    data = ctx.data()
    stdout = run_process([
        sys.executable, "-m", "bench.bench_train_step",
        "--run", "random", "configs/tiny_cmask.json", "method.options.mask_selection=random",
        "--run", "agent", "configs/tiny_cmask.json",
        "--set", f"data.train={data / 'train'}", f"data.eval={data / 'heldout'}",
        "--steps", str(ctx.args.steps), "--no-memory"])
    rows = {row["provider"]: row for row in map(json.loads, (l for l in stdout.splitlines() if l.startswith("{")))}
    agent = rows["agent"]
    low, high = agent["overhead_time_vs_random_ci95"]
    return (f"step {rows['random']['ms']:.1f} ms with random masks, {agent['ms']:.1f} ms with the agent: "
            f"{agent['overhead_time_vs_random']:.2f}x (95% CI {low:.2f}-{high:.2f})")


def overlap_rows(ctx: Context) -> list[Row]:
    return [run_row("overlap: cmask step, agent vs random masks", lambda: check_overlap(ctx))]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
SECTIONS: dict[str, Callable[[Context], list[Row]]] = {
    "kernels": kernel_rows, "bench": bench_rows, "dali": dali_rows, "train": train_rows, "overlap": overlap_rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTION_ORDER, default=list(SECTION_ORDER), metavar="SECTION",
                        help=f"run only these sections, of {', '.join(SECTION_ORDER)} (default: all)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per method and precision (>= 4)")
    parser.add_argument("--data", default=str(REPO / "data" / "synth"),
                        help="built-in data folder with train/ and heldout/ (generated under --out if absent)")
    parser.add_argument("--out", default=None, help="folder for runs and generated data (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be at least 4 (the loss is compared between the first and last quarter)")
    args.only = [section for section in SECTION_ORDER if section in args.only]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_check needs one NVIDIA GPU: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Nothing was run.", file=sys.stderr)
        return 2
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"sections: {' '.join(args.only)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastvl-gpu-check-") as scratch:
        args.out = args.out or scratch
        ctx = Context(args)
        rows = []
        for section in args.only:
            try:
                rows += SECTIONS[section](ctx)
            except Exception as error:  # a section that cannot even start is one failed row
                rows.append(Row(section, "FAIL", f"{type(error).__name__}: {error}"))
    print()
    print(format_table(rows))
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
