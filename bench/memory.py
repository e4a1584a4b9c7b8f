"""Memory and throughput of the data path at Fashion-MNIST scale: ingest -> tokenize -> extract_orders
(streamed shard by shard) -> sampling, with the peak resident memory (RSS) of each phase.

    OMP_NUM_THREADS=1 python -m bench.memory                  # the full 60k train set (slow on CPU)
    OMP_NUM_THREADS=1 python -m bench.memory --images 2000    # measure, then extrapolate to 60k
    OMP_NUM_THREADS=1 python -m bench.memory --decode-step    # candidate scoring at 16x16, V=16384 only
    OMP_NUM_THREADS=1 python -m bench.memory --ingest-tokenize --json bench/logs/ingest_tokenize.json
    OMP_NUM_THREADS=1 python -m bench.memory --ingest-tokenize --sizes 1000 2000 --generated 3000   # quick

The tokenizer and the AR model are untrained unless --tokenizer / --model are given: memory and speed do not
depend on the weights, only on the shapes (default: 7x7 grid, 256 codes, the pipeline model, 4 layers x d=128).
The memory bound
checked: extraction adds at most --bound-mb over the RSS before it, whatever the number of images, because
run_extract holds one shard (shard_size token grids + their outputs) at a time. Writes into a temp folder.

--decode-step measures the peak memory of the widest confidence-order decode steps (the first ones: C = N
candidates) at a 16x16 grid with a 16384-code vocabulary and a small random model, for order extraction
(teacher forcing, gt_prob) and for sampling (CFG doubles the rows), before (every candidate in one forward,
as a budget >= C gives) and after (the default `candidate_chunk_mb`). Peak: the kernel's high-water RSS
(VmHWM, reset through /proc/self/clear_refs) above the RSS before, on CPU; torch.cuda.max_memory_allocated
above the allocated memory before, on CUDA.

--ingest-tokenize runs the `ingest`, `tokenizer` (--tokenizer-steps steps) and `tokenize` stages as subprocesses by
their dvc.yaml command lines (bench.scale.run_stage: wall time, and peak RSS of the process tree) at each of
--sizes of Fashion-MNIST and on --generated synthetic PNGs (made once in --workdir), and checks each ingest and
tokenize peak against --bound-mb: a streaming data path keeps it flat whatever the number of images.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

FULL = 60000
MB = 2**20


class PeakRSS:
    """Samples this process's RSS every `every` seconds in a thread; .peak is the max seen inside the block."""

    def __init__(self, every: float = 0.02):
        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class PeakMemory:
    """Peak memory above the start of the block: exact, not sampled (the kernel's high-water RSS on CPU, the
    caching allocator's peak on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def _now(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
            self.start = psutil.Process().memory_info().rss
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.peak = self._now() - self.start


class _Stop(Exception):
    pass


def decode_step_peaks(batch: int, steps: int = 2, grid: int = 16, vocab: int = 16384, device=None) -> dict:
    """Peak memory (MB) of the first `steps` confidence-order steps, unchunked vs the default budget."""
    from oar_core.decode import CANDIDATE_CHUNK_MB, candidate_chunk, decode
    from oar_core.model import GPT, GPTConfig
    from oar_core.names import LocationRule

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(grid_h=grid, grid_w=grid, vocab_size=vocab, num_classes=10, n_layer=2, n_head=4,
                          d_model=128)).to(device).eval()
    tokens_BN = torch.randint(0, vocab, (batch, grid * grid), device=device)
    labels_B, rows = torch.arange(batch, device=device) % 10, torch.arange(batch, device=device)

    def peak(budget_mb, n_steps=steps, **kw) -> float:
        def pick(t, pos_B, logits_BV):  # the content does not matter for memory: feed the true tokens
            if t == n_steps - 1:
                raise _Stop
            return tokens_BN[rows, pos_B]

        with PeakMemory(device) as m:
            try:
                decode(model, labels_B, pick, order="confidence", candidate_chunk_mb=budget_mb, **kw)
            except _Stop:
                pass
        return m.peak / MB

    peak(CANDIDATE_CHUNK_MB, 1)  # warm-up: one-time allocations (thread pools, kernels) are not the step's
    out = {}
    for name, kw in {"extraction (gt_prob)": dict(gt_tokens_BN=tokens_BN, location=LocationRule(score="gt_prob")),
                     "sampling (CFG 2.5)": dict(cfg_scale=2.5)}.items():
        R = batch * (2 if "cfg_scale" in kw else 1)
        t0 = time.perf_counter()
        before, after = peak(1e9, **kw), peak(CANDIDATE_CHUNK_MB, **kw)
        out[name] = {"rows": R, "chunk": min(grid * grid, candidate_chunk(CANDIDATE_CHUNK_MB, R, vocab)),
                     "before_mb": round(before, 1), "after_mb": round(after, 1), "ratio": round(before / after, 2),
                     "seconds": round(time.perf_counter() - t0, 1)}
    return {"device": str(device), "threads": torch.get_num_threads(), "grid": grid, "vocab": vocab,
            "batch": batch, "steps": steps, "budget_mb": CANDIDATE_CHUNK_MB, "modes": out}


def print_decode_step(fig: dict) -> None:
    g = fig["grid"]
    print(f"peak memory of the first {fig['steps']} confidence-order steps (C = {g * g} candidates): {g}x{g} grid, "
          f"V={fig['vocab']}, batch {fig['batch']}, 2 layers d=128, {fig['device']}, {fig['threads']} threads")
    after = f"after ({fig['budget_mb']:.0f} MB)"
    print(f"{'':<22}{'rows':>6}{'chunk':>7}{'before (C in one)':>19}{after:>16}{'ratio':>8}{'seconds':>9}")
    for name, r in fig["modes"].items():
        print(f"{name:<22}{r['rows']:>6}{r['chunk']:>7}{r['before_mb']:>16.0f} MB{r['after_mb']:>13.0f} MB"
              f"{r['ratio']:>7.1f}x{r['seconds']:>9.1f}")


def data_path(a) -> dict:
    """The in-process phases: ingest -> tokenize -> extract_orders -> confidence sampling."""
    from bench.helpers import sample_model
    from oar_core.model import GPT, GPTConfig, save_gpt
    from oar_core.params import (
        ExtractParams,
        IngestParams,
        ModelParams,
        SampleModelParams,
        SampleParams,
        TokenizeParams,
    )
    from oar_core.token_shards import load_tokens
    from oar_core.tokenizer import VQTokenizer, load_tokenizer, save_tokenizer
    from pipeline.extract_orders import run_extract
    from pipeline.ingest import run_ingest
    from pipeline.tokenize import run_tokenize

    a.shard_size = a.shard_size or TokenizeParams().shard_size
    a.batch = a.batch or ExtractParams().batch_size
    a.fashion_mnist_dir = a.fashion_mnist_dir or IngestParams().source
    n_sample = a.sample if a.sample is not None else a.images
    torch.manual_seed(0)
    rows, fig = [], {"images": a.images, "threads": torch.get_num_threads(), "shard_size": a.shard_size}

    def phase(name, n, fn):
        with PeakRSS() as m:
            out = fn()
        rows.append((name, n, m.seconds, n / m.seconds if n else float("nan"), m.start / MB, m.peak / MB))
        fig[name] = {"n": n, "seconds": round(m.seconds, 2), "images_per_s": round(n / m.seconds, 2) if n else None,
                     "rss_before_mb": round(m.start / MB, 1), "peak_rss_mb": round(m.peak / MB, 1),
                     "growth_mb": round((m.peak - m.start) / MB, 1)}
        return out

    with tempfile.TemporaryDirectory(prefix="oar-bench-memory-") as tmp:
        tmp = Path(tmp)
        fig["baseline_rss_mb"] = round(psutil.Process().memory_info().rss / MB, 1)
        phase("ingest", a.images, lambda: run_ingest(IngestParams(
            source=a.fashion_mnist_dir, out_dir=str(tmp / "ingest"), max_train=a.images, max_test=a.test_images)))
        tok_path = a.tokenizer or tmp / "tokenizer.pt"
        if not a.tokenizer:
            save_tokenizer(tok_path, VQTokenizer(28, 1, 7, codebook_size=256))
        phase("tokenize", a.images + a.test_images, lambda: run_tokenize(
            TokenizeParams(out=str(tmp / "shards"), shard_size=a.shard_size), tmp / "ingest", tok_path))
        tokens = load_tokens(tmp / "shards", "train")["tokens"]
        fig["token_array_mb"] = {"uint16_on_disk": round(tokens.nbytes / MB, 2),
                                 "int64_in_train": round(tokens.size * 8 / MB, 2),
                                 "int64_at_60k": round(FULL * tokens[0].size * 8 / MB, 2)}
        del tokens
        tokenizer = load_tokenizer(tok_path)
        model_path = a.model or tmp / "model.pt"
        if not a.model:
            m = ModelParams()
            save_gpt(model_path, GPT(GPTConfig(grid_h=tokenizer.grid, grid_w=tokenizer.grid,
                                               vocab_size=tokenizer.codebook_size, num_classes=10, n_layer=m.n_layer,
                                               n_head=m.n_head, d_model=m.d_model, mlp_ratio=m.mlp_ratio)),
                     order="random")
        p = ExtractParams(checkpoint=str(model_path), out_dir=str(tmp / "orders"), batch_size=a.batch, splits=["train"])
        phase("extract_orders", a.images, lambda: run_extract(p, str(tmp / "shards")))
        from oar_core.model import load_gpt

        model, _ = load_gpt(model_path)
        sp = SampleParams(n_per_model=max(10, n_sample), batch_size=min(a.batch, max(10, n_sample)))
        spec = SampleModelParams(name="bench", checkpoint=str(model_path), order="confidence")
        if n_sample:
            phase("sample_confidence", n_sample,
                  lambda: sample_model(model, tokenizer, spec, sp, "cpu", progress=False))
    fig["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux

    print(f"threads={fig['threads']} shard_size={a.shard_size} baseline RSS {fig['baseline_rss_mb']} MB")
    print(f"{'phase':<18}{'images':>8}{'seconds':>10}{'img/s':>9}{'RSS before':>12}{'peak RSS':>10}{'growth':>9}"
          f"{'60k est.':>11}")
    for name, n, sec, rate, before, peak in rows:
        est = f"{FULL / rate / 3600:.2f} h" if rate == rate and rate > 0 else "-"
        print(f"{name:<18}{n:>8}{sec:>10.1f}{rate:>9.1f}{before:>10.0f}MB{peak:>8.0f}MB{peak - before:>7.0f}MB"
              f"{est:>11}")
    print(f"process peak (ru_maxrss) {fig['ru_maxrss_mb']} MB; token arrays: {fig['token_array_mb']}")
    growth = max(fig[k]["growth_mb"] for k in ("extract_orders", "sample_confidence") if k in fig)
    fig["bound_ok"] = growth <= a.bound_mb
    print(f"extraction/sampling RSS growth {growth:.0f} MB {'<=' if fig['bound_ok'] else '>'} "
          f"bound {a.bound_mb:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2))
    return fig


# ----------------------------------------------------------------------------- --ingest-tokenize: stage subprocesses

def generated_folder(folder: Path, n: int, seed: int = 0, batch: int = 1000) -> Path:
    """`n` 28x28 grayscale PNGs in 10 class sub-folders (a class: a stripe angle; an image: its own frequency,
    phase, disc mask, bright box and noise), made once: reused when `<folder>.complete` says n."""
    from PIL import Image
    from tqdm import tqdm

    done = folder.with_name(folder.name + ".complete")
    if done.exists() and done.read_text().strip() == str(n):
        print(f"reusing {n} generated images in {folder}", flush=True)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for c in range(10):
        (folder / f"class{c}").mkdir(parents=True)
    rng, (yy, xx) = np.random.default_rng(seed), np.mgrid[0:28, 0:28].astype(np.float32)
    with tqdm(total=n, unit="img", desc=f"generate {folder.name}", mininterval=2) as bar:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            labels = np.arange(start, start + b) % 10

            def r(lo, hi):  # one value per image, broadcast over the pixels
                return rng.uniform(lo, hi, (b, 1, 1)).astype(np.float32)

            angle = labels[:, None, None] * np.pi / 10 + r(-0.15, 0.15)
            stripes = 0.5 + 0.5 * np.sin(r(0.3, 1.2) * (xx * np.cos(angle) + yy * np.sin(angle)) + r(0, 2 * np.pi))
            disc = (xx - r(8, 20)) ** 2 + (yy - r(8, 20)) ** 2 < r(5, 13) ** 2
            x0, y0 = r(0, 20), r(0, 20)
            box = (xx >= x0) & (xx < x0 + r(3, 10)) & (yy >= y0) & (yy < y0 + r(3, 10))
            img = stripes * disc + 0.6 * box + rng.normal(0, 0.08, (b, 28, 28))
            img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            for i in range(b):
                Image.fromarray(img[i]).save(folder / f"class{labels[i]}" / f"{start + i:07d}.png", compress_level=1)
            bar.update(b)
    done.write_text(str(n))
    return folder


def _datasets(a) -> list[tuple[str, dict]]:
    """(label, ingest overrides) per data size: --sizes TRAIN[:TEST] (TEST defaults to TRAIN/6) or `all`."""
    out = []
    for size in a.sizes:
        if size == "all":
            out.append(("fashion-mnist all", {"ingest.max_train": None, "ingest.max_test": None}))
        else:
            train, _, test = size.partition(":")
            train, test = int(train), int(test) if test else max(1, int(train) // 6)
            out.append((f"fashion-mnist {train}+{test}", {"ingest.max_train": train, "ingest.max_test": test}))
    if a.generated:
        folder = generated_folder(a.workdir / f"gen-{a.generated}", a.generated)
        out.append((f"generated {a.generated}", {"ingest.source": str(folder), "ingest.max_train": None,
                                                  "ingest.max_test": None}))
    return out


def ingest_tokenize(a) -> dict:
    """Peak RSS and wall time of the ingest, tokenizer (few steps) and tokenize stages, each run by its dvc.yaml
    command line in a fresh folder per data size."""
    from bench.scale import check, dag_stages, run_stage, write_params

    cmds = {name: cmd for name, cmd, _ in dag_stages()}
    a.workdir = Path(a.workdir).resolve()
    a.workdir.mkdir(parents=True, exist_ok=True)
    stages = ("ingest", "tokenizer", "tokenize")
    fig = {"bound_mb": a.bound_mb, "tokenizer_steps": a.tokenizer_steps, "workdir": str(a.workdir),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "rows": []}
    for label, overrides in _datasets(a):
        run = a.workdir / f"run-{label.replace(' ', '-').replace('+', '_')}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        params = write_params(run, {**overrides, "tokenizer.steps": a.tokenizer_steps})
        row = {"data": label}
        for name in stages:
            print(f"==> {label}: {name}: {cmds[name]}", flush=True)
            r = run_stage(name, cmds[name], run, log_dir=a.workdir / "logs" / run.name)
            check(name, r, a.workdir / "logs" / run.name)
            print(f"==> {label}: {name}: {r['wall_s']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            row[name] = r
            if name == "ingest":
                manifest = json.loads((run / params["ingest"]["out_dir"] / "manifest.json").read_text())
                row["counts"] = manifest["counts"]
                row["images"] = sum(manifest["counts"].values())
        row["pass"] = all(row[s]["peak_rss_mb"] <= a.bound_mb for s in ("ingest", "tokenize"))
        fig["rows"].append(row)
        if not a.keep:
            shutil.rmtree(run)

    rows = sorted(fig["rows"], key=lambda r: r["images"])
    fig["ratio_largest_to_smallest"] = {s: round(rows[-1][s]["peak_rss_mb"] / rows[0][s]["peak_rss_mb"], 2)
                                        for s in stages}
    lines = [f"| data | images | ingest s / peak MB | tokenize s / peak MB | <= {a.bound_mb:.0f} MB | "
             f"tokenizer ({a.tokenizer_steps} steps) s / peak MB |", "|---|---|---|---|---|---|"]
    cell = lambda r: f"{r['wall_s']:.1f} / {r['peak_rss_mb']:.0f}"  # noqa: E731
    lines += [f"| {r['data']} | {r['images']} | {cell(r['ingest'])} | {cell(r['tokenize'])} | "
              f"{'PASS' if r['pass'] else 'FAIL'} | {cell(r['tokenizer'])} |" for r in fig["rows"]]
    print("\n" + "\n".join(lines))
    print(f"\npeak RSS at {rows[-1]['images']} images / at {rows[0]['images']}: " + ", ".join(
        f"{s} {v:.2f}x" for s, v in fig["ratio_largest_to_smallest"].items()) + " (flat memory: ~1x); bound "
        f"{a.bound_mb:.0f} MB on ingest and tokenize: {sum(r['pass'] for r in rows)}/{len(rows)} PASS")
    fig["all_pass"] = all(r["pass"] for r in rows)
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2))
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=FULL, help="train images to ingest, tokenize and extract")
    ap.add_argument("--test-images", type=int, default=500)
    ap.add_argument("--sample", type=int, default=None, help="images to sample (default: --images)")
    ap.add_argument("--shard-size", type=int, default=None, help="default: the params default")
    ap.add_argument("--batch", type=int, default=None, help="extraction batch (default: the params default)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--fashion-mnist-dir", default=None, help="default: the params default")
    ap.add_argument("--bound-mb", type=float, default=1024.0, help="allowed RSS growth during extraction/sampling; "
                    "with --ingest-tokenize: allowed peak RSS of the ingest and tokenize stages")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--decode-step", action="store_true", help="only the candidate-scoring peak (see above)")
    ap.add_argument("--decode-batch", type=int, default=64, help="images per batch for --decode-step")
    it = ap.add_argument_group("--ingest-tokenize (see above)")
    it.add_argument("--ingest-tokenize", action="store_true", help="peak RSS of the stage subprocesses, per data size")
    it.add_argument("--sizes", nargs="*", default=["6000:1000", "all"],
                    help="Fashion-MNIST sizes: TRAIN[:TEST] (TEST default TRAIN/6) or all")
    it.add_argument("--generated", type=int, default=100_000, help="generated PNGs as the last size (0: none)")
    it.add_argument("--tokenizer-steps", type=int, default=20)
    it.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "oar-bench-ingest-tokenize"),
                    help="runs, logs and the generated images (kept and reused)")
    it.add_argument("--keep", action="store_true", help="keep each size's run folder")
    a = ap.parse_args(argv)
    if a.decode_step:
        fig = decode_step_peaks(a.decode_batch)
        print_decode_step(fig)
        if a.json:
            Path(a.json).write_text(json.dumps(fig, indent=2))
        return fig
    if a.ingest_tokenize:
        return ingest_tokenize(a)
    return data_path(a)


if __name__ == "__main__":
    main()
