"""Benchmark the real pipeline on a synthetic volume with a random-initialised DINOv3 of a chosen size.

Prints the time of each phase of one end-to-end run (file in, four outputs written), the backbone-only time for the
same slices measured in the same run, their ratio, throughput and peak memory; then bank building, and a synthetic
bank of 10,000 slices (disk size, open time, query memory). The last line of output is one JSON object.

Random weights cost exactly what real ones do; they say nothing about detection quality and none is reported.

    python pipelines/benchmark.py --backbone-size s --image-size 224 --slices 155 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from himatch_med import io, jobs
from himatch_med.bank.build import build_bank
from himatch_med.bank.data import Bank, BankInfo
from himatch_med.config import Settings
from himatch_med.detect import Detector, load_extractor, stage_distances
from himatch_med.features import Features
from himatch_med.timing import Timer
from himatch_med.transforms import to_backbone_images
from himatch_med.volume import backbone_size

SIZES = {  # hidden size, heads, blocks: the published DINOv3 ViT-S/B/L configurations
    "s": (384, 6, 12),
    "b": (768, 12, 12),
    "l": (1024, 16, 24),
}
PHASES = ("load", "preprocess", "backbone", "retrieval", "matching", "fusion", "resample", "save")


def random_dinov3(size: str, folder: Path) -> Path:
    """Save a random-initialised DINOv3 of the given size (4 registers, patch 16) with save_pretrained."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    hidden, heads, depth = SIZES[size]
    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads,
                             num_hidden_layers=depth, num_register_tokens=4, patch_size=16)
    DINOv3ViTModel(config).save_pretrained(folder)
    return folder


def synthetic_brain(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A textured ellipsoid on an exact-zero background (int16, like a skull-stripped MRI)."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    inside = sum((a / 0.85) ** 2 for a in axes) < 1
    texture = 600 + 200 * np.sin(axes[0] * 19) * np.cos(axes[1] * 13) + 80 * np.sin(axes[2] * 7)
    return ((texture + rng.normal(0, 20, shape)) * inside).astype(np.int16)


def save(array: np.ndarray, path: Path) -> Path:
    affine = np.diag([-0.9375, -0.9375, 1.0, 1.0])  # LPS-stored 240 x 240 at 0.94 mm, like many brain MRIs
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def peak_host_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def anonymous_mib() -> float:
    """Private (non file-backed) resident memory: what memory-mapped banks do not add to."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synchronizer(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def end_to_end(args, settings: Settings, device: torch.device, work: Path) -> dict:
    timer_sync = synchronizer(device)
    started = time.perf_counter()
    extractor = load_extractor(settings, str(device))
    model_load = time.perf_counter() - started
    shape = (args.in_plane, args.in_plane, args.slices)
    reference_shape = (args.in_plane, args.in_plane, args.reference_slices or args.slices)
    references = [save(synthetic_brain(reference_shape, seed), work / f"normal{seed}.nii.gz") for seed in (1, 2)]
    query = save(synthetic_brain(shape, 3), work / "query.nii.gz")

    started = time.perf_counter()
    volumes = ((str(p), jobs.read(p, settings).prepared) for p in references)
    bank = build_bank(extractor, volumes, settings)
    bank_seconds = time.perf_counter() - started
    bank = bank.to(device)
    detector = Detector(extractor, bank, settings)

    # Warm-up: a short volume through the whole job (imports, first calls, allocator), so that neither timed run
    # pays for first-call costs.
    warm = save(synthetic_brain((args.in_plane, args.in_plane, settings.batch_size), 4), work / "warm.nii.gz")
    jobs.analyse(jobs.read(warm, settings), detector, work / "warm", progress=False)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    def timed(job) -> float:
        if timer_sync:
            timer_sync()
        started = time.perf_counter()
        job()
        if timer_sync:
            timer_sync()
        return time.perf_counter() - started

    # End to end and backbone alone alternate, so that a passing load on the machine hits both alike; the fastest
    # of each is kept (the usual estimate of what the code itself costs).
    runs, backbone_runs, timers = [], [], []
    for repeat in range(args.repeats):
        timer = Timer(timer_sync)
        outcome = {}

        def job(timer=timer, outcome=outcome, repeat=repeat):
            outcome["job"] = jobs.read(query, settings, timer=timer)
            outcome["report"] = jobs.analyse(outcome["job"], detector, work / f"out{repeat}", progress=False,
                                             timer=timer)

        runs.append(timed(job))
        timers.append(timer)
        # Backbone alone on exactly the same backbone images and batches.
        prepared = outcome["job"].prepared
        height, width = prepared.slices.shape[1:]
        size = backbone_size(height, width, image_size=settings.image_size, patch_size=extractor.patch_size)
        scored = torch.nonzero(prepared.scored).flatten()
        images = [to_backbone_images(prepared.slices[part].to(device), size)
                  for part in scored.split(settings.batch_size)]
        backbone_runs.append(timed(lambda images=images: [extractor(batch) for batch in images]))
    total, backbone_only = min(runs), min(backbone_runs)
    timer = timers[runs.index(total)]
    report = outcome["report"]

    phases = {phase: round(timer.seconds.get(phase, 0.0), 3) for phase in PHASES}
    slices = int(prepared.scored.sum())
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        _cpu_name(), "threads": torch.get_num_threads(), "backbone_size": args.backbone_size,
        "image_size": args.image_size, "backbone_image": list(size), "volume_shape": list(shape),
        "scored_slices": slices,
        "batch_size": settings.batch_size, "model_load_seconds": round(model_load, 3), "phases_seconds": phases,
        "end_to_end_seconds": round(total, 3), "backbone_only_seconds": round(backbone_only, 3),
        "runs_seconds": {"end_to_end": [round(r, 3) for r in runs],
                         "backbone_only": [round(r, 3) for r in backbone_runs]},
        "ratio_to_backbone": round(total / backbone_only, 3),
        "slices_per_second": round(slices / total, 2), "backbone_slices_per_second": round(slices / backbone_only, 2),
        "bank_build": {"volumes": 2, "slices": len(bank), "seconds": round(bank_seconds, 3),
                       "slices_per_second": round(len(bank) / bank_seconds, 2)},
        "peak_host_mib": round(peak_host_mib(), 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "volume_score": report["volume_score"],
    }


def large_bank(args, device: torch.device, work: Path) -> dict:
    """A synthetic 10,000-slice ViT-B bank: size on disk, open time, query memory against a small one."""
    n, stages, cents, dim, cells = args.large_bank_slices, 4, 32, 768, 16
    generator = torch.Generator().manual_seed(0)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1).half()

    tensors = {
        "cls": unit(n, dim), "layout": unit(n, cells, dim), "centroids": torch.empty(n, stages, cents, dim,
                                                                                     dtype=torch.float16),
        "sizes": torch.ones(n, stages, cents, dtype=torch.int32), "positions": torch.rand(n, generator=generator),
        "groups": torch.arange(n) // 155, "calibration_mean": torch.full((stages,), 0.3),
        "calibration_std": torch.full((stages,), 0.05),
        "calibration_slice_scores": torch.randn(512, generator=generator),
        "calibration_volume_scores": torch.randn(64, generator=generator),
    }
    for start in range(0, n, 1000):  # filled in parts: a 2 GB tensor of randn at once would double peak memory
        tensors["centroids"][start:start + 1000] = unit(min(1000, n - start), stages, cents, dim)
    array_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    info = BankInfo(settings={"model": "synthetic"})
    started = time.perf_counter()
    folder = io.write_bank(tensors, Bank(**tensors, info=info).metadata, work / "large_bank")
    write_seconds = time.perf_counter() - started
    del tensors
    gc.collect()
    disk = sum(p.stat().st_size for p in folder.iterdir())

    timings = {}
    for verify in (False, True):
        started = time.perf_counter()
        stored, meta = io.read_bank(folder, verify=verify)
        bank = Bank.from_stored(stored, meta, source=str(folder))
        timings[verify] = time.perf_counter() - started

    settings = Settings(model="synthetic", references_k=8, position_window=0.0).resolved()
    queries = 155
    grid = (14, 14)
    features = Features(unit(queries, dim).float(), unit(queries, cells, dim).float(),
                        tuple(unit(queries, *grid, dim).float() for _ in range(stages)))
    features = Features(features.cls.to(device), features.layout.to(device),
                        tuple(g.to(device) for g in features.grids))
    positions = torch.rand(queries)
    small = Bank(**{name: (t[:1000] if t.dim() and len(t) == n else t) for name, t in bank.tensors().items()},
                 info=bank.info)
    memory = {}
    for name, which in (("1000", small), (str(n), bank)):
        gc.collect()
        before = anonymous_mib()
        started = time.perf_counter()
        for part in range(0, queries, 16):
            piece = Features(features.cls[part:part + 16], features.layout[part:part + 16],
                             tuple(g[part:part + 16] for g in features.grids))
            stage_distances(piece, which.to(device), settings, positions[part:part + 16])
        memory[name] = {"anonymous_growth_mib": round(anonymous_mib() - before, 1),
                        "query_seconds": round(time.perf_counter() - started, 3)}
    return {"slices": n, "array_bytes": array_bytes, "disk_bytes": disk, "disk_ratio": round(disk / array_bytes, 4),
            "write_seconds": round(write_seconds, 2), "open_seconds": round(timings[False], 3),
            "open_verified_seconds": round(timings[True], 3), "query_155_slices": memory}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone-size", choices=tuple(SIZES), default="s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--in-plane", type=int, default=240, help="slice size of the synthetic volume (square)")
    parser.add_argument("--reference-slices", type=int, default=None,
                        help="slices of each of the 2 reference volumes (default: --slices)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 64 on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest is reported")
    parser.add_argument("--large-bank-slices", type=int, default=10_000, help="0 to skip the large-bank part")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch_size or (64 if device.type == "cuda" else 16)
    with tempfile.TemporaryDirectory(prefix="himatch-bench-") as folder:
        work = Path(folder)
        model = random_dinov3(args.backbone_size, work / "model")
        settings = Settings(model=str(model), image_size=args.image_size, batch_size=batch,
                            calibration_slices=128).resolved()
        result = end_to_end(args, settings, device, work)
        print(f"end to end {result['end_to_end_seconds']} s, backbone only {result['backbone_only_seconds']} s, "
              f"ratio {result['ratio_to_backbone']}; phases {result['phases_seconds']}", file=sys.stderr)
        if args.large_bank_slices:
            result["large_bank"] = large_bank(args, device, work)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
