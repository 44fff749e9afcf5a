"""Benchmark: the shard index at start-up, before (the Python-object index of commit eab9fe7) and after (the compact
numpy index and its cache), for N synthetic samples (default 1,000,000).

Writes img2dataset-shaped shards once (keys ``SSSSSIIII``: 9 digits; each sample a 1-byte ``.jpg``,
a 1-byte ``.txt`` and, for two samples in three, a 1-byte ``.json``; about 2.7 KB of tar per
sample, so 2.7 GB for 1M) into ``--folder``, then measures each start-up in a fresh process:

* ``before``: ``index_shards`` of ``fastvl/data/shards.py`` at eab9fe7 (``git show``; the last commit with it): header
  scan into Python lists;
* ``scan``: the compact index, scanned (what a first start costs, cache write included);
* ``load``: the compact index from its cache (what every later start and every other rank costs);
  the arrays are memory-mapped, so RSS is given right after loading and after touching every page.

Printed per case: wall time, bytes per sample (RSS growth / N; for the compact index also its array
bytes / N) and RSS. A second run reuses the shards (delete ``--folder`` to rebuild them).

    cd /work/main && OMP_NUM_THREADS=1 python -m bench.bench_index [--samples 1000000] [--folder /tmp/fastvl-index-bench]
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 10_000


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_shards(folder: Path, samples: int) -> list[Path]:
    """Shards of ``SHARD_SIZE`` samples, headers written by ``tarfile`` (ustar), 1-byte payloads."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in tqdm(range(-(-samples // SHARD_SIZE)), desc="write shards", unit="shard"):
        path = folder / f"{shard:05d}.tar"
        paths.append(path)
        if path.exists():
            continue
        blocks = []
        for i in range(min(SHARD_SIZE, samples - shard * SHARD_SIZE)):
            key = f"{shard:05d}{i:04d}"
            for extension in ("jpg", "txt", "json") if i % 3 else ("jpg", "txt"):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = 1
                blocks.append(info.tobuf(format=tarfile.USTAR_FORMAT) + b"x" + b"\0" * 511)
        blocks.append(b"\0" * 1024)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(b"".join(blocks))
        os.replace(temporary, path)
    settled = time.time() - 60  # older than shards.SETTLE_SECONDS, so the index may be cached
    for path in paths:
        os.utime(path, (settled, settled))
    return paths


BEFORE_COMMIT = "eab9fe7"
"""The last commit whose shard index was Python lists of per-sample objects."""


def before_shards_module():
    """fastvl/data/shards.py of BEFORE_COMMIT, imported as fastvl.data._shards_before."""
    source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:fastvl/data/shards.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "fastvl_shards_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fastvl.data._shards_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(case: str, folder: Path, cache: Path) -> dict:
    """One start-up in this process (run by ``main`` in a fresh interpreter per case)."""
    import numpy as np

    import fastvl.data.shards as shards

    paths = sorted(folder.glob("*.tar"))
    if case == "before":
        module = before_shards_module()
        base = rss_bytes()
        started = time.perf_counter()
        index = module.index_shards(paths)
        seconds = time.perf_counter() - started
        return {"case": case, "samples": len(index), "seconds": seconds, "rss_mb": rss_bytes() / 2 ** 20,
                "rss_bytes_per_sample": (rss_bytes() - base) / len(index)}
    if case == "scan":
        for old in cache.glob("*.idx"):
            old.unlink()
    base = rss_bytes()
    started = time.perf_counter()
    index = shards.load_index(paths, str(cache))
    seconds = time.perf_counter() - started
    row = {"case": case, "samples": len(index), "seconds": seconds, "rss_mb": rss_bytes() / 2 ** 20,
           "rss_bytes_per_sample": (rss_bytes() - base) / len(index),
           "array_bytes_per_sample": index.nbytes / len(index)}
    if case == "load":
        assert isinstance(index.records, np.memmap), "the cache was not used"
        touched = int(index.records["image_size"].sum()) + int(index.key_bytes.sum()) + int(index.key_ends[-1])
        row["rss_mb_all_pages_touched"] = rss_bytes() / 2 ** 20
        row["checksum"] = touched
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/fastvl-index-bench"))
    parser.add_argument("--measure", choices=["before", "scan", "load"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shard_folder, cache = args.folder / f"shards-{args.samples}", args.folder / "cache"
    if args.measure:
        print(json.dumps(measure(args.measure, shard_folder, cache)))
        return
    write_shards(shard_folder, args.samples)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in ("before", "scan", "load"):
        done = subprocess.run([sys.executable, "-m", "bench.bench_index", "--samples", str(args.samples),
                               "--folder", str(args.folder), "--measure", case], cwd=ROOT, check=True,
                              capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'case':8} {'samples':>9} {'seconds':>8} {'B/sample (RSS)':>15} {'B/sample (arrays)':>18} {'RSS MB':>8}")
    for row in rows:
        arrays = row.get("array_bytes_per_sample")
        print(f"{row['case']:8} {row['samples']:>9} {row['seconds']:>8.2f} {row['rss_bytes_per_sample']:>15.1f} "
              f"{'' if arrays is None else f'{arrays:.1f}':>18} {row['rss_mb']:>8.1f}"
              + (f"  (all pages touched: {row['rss_mb_all_pages_touched']:.1f} MB)" if "rss_mb_all_pages_touched" in row else ""))


if __name__ == "__main__":
    main()
