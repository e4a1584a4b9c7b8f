"""Decoding and training throughput, KV-cached vs uncached, and where-next by confidence vs by a learned
location policy vs raster, at several grid sizes, measured side by side in one run.

    python -m bench.decode [--layers 4 --d-model 128 --grid 7 --batch 64 --policy-grids 7 14]

Uncached = a full causal forward over prefix + candidate for every candidate at every step (what a model
without the dual positional encoding's one-forward candidate scoring, or without a cache, has to do).
"""
import argparse
import time

import torch

from oar_core.decode import CachedForward, generate
from oar_core.extract import extract_batch
from oar_core.model import GPT, GPTConfig
from oar_core.names import LocationRule
from oar_core.runtime import autocast, pick_device
from tests.reference_decode import UncachedForward


def timed(fn, repeat=1):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--uncached-batch", type=int, default=8, help="uncached is slow: time it on fewer images")
    ap.add_argument("--policy-grids", type=int, nargs="*", default=[7, 14],
                    help="grids at which raster, policy and confidence sampling are compared")
    a = ap.parse_args(argv)
    device = pick_device()
    torch.manual_seed(0)
    cfg = GPTConfig(grid_h=a.grid, grid_w=a.grid, vocab_size=256, num_classes=10, n_layer=a.layers,
                    n_head=max(1, a.d_model // 64), d_model=a.d_model, policy=True)
    model = GPT(cfg).to(device).eval()
    N = cfg.n_tokens
    print(f"device={device.type} layers={a.layers} d_model={a.d_model} grid={a.grid}x{a.grid} "
          f"params={model.num_params() / 1e6:.2f}M threads={torch.get_num_threads()}")

    def images_per_s(fn, B):
        return B / timed(lambda: fn(B))

    rows = []
    for name, order in [("sample confidence", "confidence"), ("sample raster", "raster")]:
        def run(B, cache, order=order):
            labels = torch.arange(B, device=device) % 10
            with autocast(device):
                generate(model, labels, order=order, generator=torch.Generator().manual_seed(0),
                         forward=CachedForward if cache else UncachedForward)
        rows.append((name, images_per_s(lambda B: run(B, True), a.batch),
                     images_per_s(lambda B: run(B, False), a.uncached_batch)))

    def extract(B, cache):
        tokens = torch.randint(0, 256, (B, N), device=device)
        with autocast(device):
            extract_batch(model, tokens, torch.arange(B, device=device) % 10, LocationRule(score="gt_prob"),
                          forward=CachedForward if cache else UncachedForward)
    rows.append(("extract orders", images_per_s(lambda B: extract(B, True), a.batch),
                 images_per_s(lambda B: extract(B, False), a.uncached_batch)))

    print("\n| path | KV-cached img/s | uncached img/s | speed-up |\n|---|---|---|---|")
    for name, cached, naive in rows:
        print(f"| {name} | {cached:.1f} | {naive:.2f} | {cached / naive:.1f}x |")

    print("\n| grid | raster img/s | policy img/s | confidence img/s | policy / raster | policy / confidence |\n"
          "|---|---|---|---|---|---|")
    for grid in a.policy_grids:
        torch.manual_seed(0)
        m = GPT(GPTConfig(**{**cfg.__dict__, "grid_h": grid, "grid_w": grid})).to(device).eval()
        ips = {}
        for order in ("raster", "policy", "confidence"):
            B = a.batch if order != "confidence" else max(1, a.batch * 49 // (grid * grid))  # confidence: N^2 rows

            def draw(B, order=order):
                with autocast(device):
                    generate(m, torch.arange(B, device=device) % 10, order=order, cfg_scale=1.0,
                             location=LocationRule(temperature=1.0), generator=torch.Generator().manual_seed(0))
            ips[order] = images_per_s(draw, B)
        print(f"| {grid}x{grid} | {ips['raster']:.1f} | {ips['policy']:.1f} | {ips['confidence']:.2f} | "
              f"{ips['policy'] / ips['raster']:.2f}x | {ips['policy'] / ips['confidence']:.1f}x |", flush=True)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (a.batch, N), device=device)
    order = torch.argsort(torch.rand(a.batch, N), dim=1).to(device)
    labels = torch.arange(a.batch, device=device) % 10

    def step():
        with autocast(device):
            loss = model.loss(tokens, order, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sec = timed(step, repeat=5)
    print(f"\ntrain: {1 / sec:.2f} steps/s, {a.batch * N / sec:,.0f} tokens/s (batch {a.batch}, any-order)")


if __name__ == "__main__":
    main()
