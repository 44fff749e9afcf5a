"""Benchmark: data loading throughput, DALI (CPU) vs the Pillow DataLoader, against what training eats.

Images per second through the whole train loader — read from shards, header check, decode,
random-resized crop + flip, resize to the tiny model's 64 x 64, normalise, tokenize, collate into a
``Batch`` of 32 — for ``data.decoder="dali"`` with N pipeline threads vs ``data.decoder="pillow"``
with N DataLoader worker processes, N = 1 and 2, on

* the built-in rendered-scene shards (96 x 96 JPEGs; ``data/synth/train`` if present, else 512
  generated into a temporary folder), and
* 512 photo-like 320 x 240 JPEGs (gradients + texture + noise, quality 90, 4:2:0) written as shards.

Then the tiny ALBEF training step (``fastvl.methods.build_method`` + ``torch.optim.AdamW``, batch 32,
CPU, fp32) is timed, and each loader's images/s is divided by the step's samples/s. Goals: DALI CPU
>= Pillow at equal threads; loader >= 3x what a training step consumes. Also measured: DALI's
decoder vs Pillow's on the same photo-like JPEG (mean absolute difference, uint8 scale) with and
without ``jpeg_fancy_upsampling``.

    cd /work/main && python -m bench.bench_data [--threads 1 2] [--batches 4]
"""
import argparse
import io
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastvl.config import load_config
from fastvl.data.loader import build_loader
from fastvl.data.shards import ShardWriter
from fastvl.data.synthetic import generate

from .harness import machine, run_cases, save_rows

BATCH = 32


def photo_like_jpeg(index: int, width: int = 320, height: int = 240) -> bytes:
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 30)
    base = rng.uniform(40, 215, 3)
    texture = 60 * np.sin((x * np.cos(angle) + y * np.sin(angle)) / period)
    pixels = np.stack([base[0] + 0.3 * x - 0.2 * y + texture, base[1] + 0.25 * y - texture,
                       base[2] + 0.15 * (x - y) + 0.5 * texture], -1)
    pixels += rng.normal(0, 14, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photo_shards(folder: Path, count: int = 512) -> Path:
    with ShardWriter(folder, shard_size=128) as writer:
        for i in range(count):
            writer.write(f"photo{i:05d}", {"jpg": photo_like_jpeg(i), "txt": f"a photo-like picture number {i}"})
    return folder


def builtin_shards(tmp: Path) -> Path:
    existing = Path("data/synth/train")
    if existing.is_dir() and any(existing.glob("*.tar")):
        return existing
    generate(tmp / "synth", train=512, heldout=0, seed=0, image_size=96, shard_size=128, progress=False)
    return tmp / "synth" / "train"


def loader_case(path: Path, decoder: str, threads: int, batches: int):
    """A callable that pulls ``batches`` batches from one long-lived train iterator."""
    cfg = load_config(None, [f"data.train={path}", f"data.eval={path}", f"data.batch_size={BATCH}",
                             f"data.num_workers={threads}", f"data.decoder={decoder}", "model.preset=tiny"])
    iterator = iter(build_loader(cfg, "train"))

    def pull():
        for batch in itertools.islice(iterator, batches):
            assert batch.images.shape == (BATCH, 3, 64, 64)

    return pull


def training_step_ms() -> tuple[float, dict]:
    """Median ms of one tiny ALBEF step (forward, backward, AdamW) on a batch of 32."""
    from fastvl.data.batch import Batch
    from fastvl.methods import build_method

    from .harness import time_ms

    cfg = load_config(None, ["model.preset=tiny", "method.name=albef"])
    torch.manual_seed(0)
    recipe = build_method(cfg)
    optimizer = torch.optim.AdamW(recipe.parameters(), lr=1e-4)
    lengths = torch.randint(8, cfg.data.max_text_len, (BATCH,))
    ids = torch.randint(1000, 5000, (BATCH, cfg.data.max_text_len))
    ids[:, 0] = 101
    mask = (torch.arange(cfg.data.max_text_len) < lengths[:, None]).long()
    ids = ids * mask
    ids[torch.arange(BATCH), lengths - 1] = 102
    size = cfg.data.image_size
    batch = Batch(torch.randn(BATCH, 3, size, size), ids, mask, [f"k{i}" for i in range(BATCH)])

    def step():
        optimizer.zero_grad(set_to_none=True)
        recipe(batch)["loss"].backward()
        optimizer.step()
        recipe.after_step(recipe.current_step + 1)

    timing = time_ms(step, warmup=3, reps=10)
    return timing["ms"], timing


def decoder_parity() -> list[dict]:
    from fastvl.data.dali import decode_images
    from fastvl.data.images import decode_rgb

    rows = []
    encoded = [photo_like_jpeg(i) for i in range(8)]
    reference = [decode_rgb(e).permute(1, 2, 0).numpy().astype(np.int32) for e in encoded]
    for fancy in (True, False):
        decoded = decode_images(encoded, jpeg_fancy_upsampling=fancy)
        mad = float(np.mean([np.abs(d.astype(np.int32) - r).mean() for d, r in zip(decoded, reference)]))
        worst = int(max(np.abs(d.astype(np.int32) - r).max() for d, r in zip(decoded, reference)))
        rows.append({"op": "dali_vs_pillow_decode", "provider": f"dali_cpu fancy={fancy}",
                     "shape": "8 x 320x240 jpeg q90 4:2:0", "machine": machine(), "mad_uint8": mad,
                     "max_abs_uint8": worst})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=4, help="batches per timed repetition")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        datasets = {"builtin 96px": builtin_shards(tmp), "photo 320x240": photo_shards(tmp / "photos")}
        print(f"datasets ready in {time.perf_counter() - started:.1f} s")
        throughput = {}
        for (name, path), threads in itertools.product(datasets.items(), args.threads):
            shape = f"{name} -> B{BATCH} 64px, threads/workers={threads}"
            cases = {"pillow": loader_case(path, "pillow", threads, args.batches),
                     "dali_cpu": loader_case(path, "dali", threads, args.batches)}
            rows = run_cases("data_loader", shape, cases, baseline="pillow", reps=args.reps, warmup=2,
                             measure_memory=False)
            for row in rows:
                throughput[(name, threads, row["provider"])] = BATCH * args.batches / (row["ms"] / 1e3)
        step_ms, timing = training_step_ms()
        consumed = BATCH / (step_ms / 1e3)
        summary = []
        for (name, threads, provider), images_per_s in throughput.items():
            summary.append({"op": "data_throughput", "provider": provider, "shape": f"{name} t{threads}",
                            "machine": machine(), "images_per_s": round(images_per_s, 1),
                            "vs_pillow_same_threads": round(images_per_s / throughput[(name, threads, "pillow")], 2),
                            "vs_train_step": round(images_per_s / consumed, 2)})
        summary.append({"op": "train_step", "provider": "tiny albef adamw fp32", "shape": f"B{BATCH}",
                        "machine": machine(), "ms": step_ms, "ms_p20": timing["ms_p20"], "ms_p80": timing["ms_p80"],
                        "images_per_s": round(consumed, 1)})
        parity = decoder_parity()
    print()
    _table(summary, ["op", "provider", "shape", "images_per_s", "vs_pillow_same_threads", "vs_train_step", "ms"])
    print()
    _table(parity, ["op", "provider", "shape", "mad_uint8", "max_abs_uint8"])
    save_rows("data_throughput", summary)
    save_rows("dali_vs_pillow_decode", parity)
    worst_dali = min(r["vs_pillow_same_threads"] for r in summary if r["provider"] == "dali_cpu")
    worst_loader = min(r["vs_train_step"] for r in summary if "vs_train_step" in r)
    print(f"\nDALI CPU vs Pillow at equal threads: worst {worst_dali:.2f}x (goal >= 1); "
          f"slowest loader vs training-step consumption ({consumed:.0f} img/s): {worst_loader:.1f}x (goal >= 3)")


def _table(rows, cols):
    """harness.print_table has fixed columns; these rows carry throughput ratios instead."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


if __name__ == "__main__":
    main()
