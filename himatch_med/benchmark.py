"""Benchmark the real pipeline: one volume end to end against the backbone alone, and bank building by phase.

The backbone is a random-initialised DINOv3 of a chosen size (random weights cost exactly what real ones do; they
say nothing about detection quality and none is reported), or real weights from a local folder (``--model``).

1. End to end: the time of each phase of one run (file in, four outputs written), the backbone-only time for the
   same slices measured in the same run (they alternate, so that a passing load hits both alike), their ratio,
   the seconds outside the backbone phase of the same run and the ratio to that phase, throughput and peak memory.
2. Bank building at each size of ``--bank-slices`` (default 100; add 2000 10000 for the growth): preprocessing,
   backbone, k-means, calibration and writing, the ratio of the whole to the backbone, and peak memory.
3. With ``--screen-volumes N``: a cohort of N volumes screened (reading and writing overlapped with the backbone),
   its throughput against the backbone alone on the same slices.
4. With ``--large-bank-slices N``: a synthetic ViT-B bank of N slices (disk size, open time, query time and memory).
5. With ``--compile-trial``: the backbone compiled by ``torch.compile`` against eager on the end-to-end volume's
   batches (the first pass, which compiles, the passes after it, and the largest difference of the outputs).

Progress goes to stderr, a summary of each part too (``-q``: none; ``-v``: also the settings and every run's phases);
the last line of stdout is one JSON object (also written to ``--json FILE``).

    himatch-med benchmark --backbone-size s --image-size 224 --slices 155 --device cpu
    himatch-med benchmark --model ~/dinov3-vitb16 --image-size 448 --bank-slices 100 2000 10000 --json b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

# Nothing heavy above this line: --help and a bad option answer at once; torch and the package load after parsing.

SIZES = {  # hidden size, heads, blocks: the published DINOv3 ViT-S/B/L configurations
    "s": (384, 6, 12),
    "b": (768, 12, 12),
    "l": (1024, 16, 24),
}
PHASES = ("load", "preprocess", "backbone", "retrieval", "matching", "fusion", "resample", "spread", "save")
BANK_PHASES = ("prepare", "preprocess", "backbone", "kmeans", "calibration", "writing")


def parser() -> argparse.ArgumentParser:
    """The parser of ``himatch-med benchmark``."""
    parser = argparse.ArgumentParser(prog="himatch-med benchmark", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--backbone-size", choices=tuple(SIZES), default="s",
                       help="random-initialised DINOv3 ViT-S/B/L (default: s)")
    model.add_argument("--model", type=Path, default=None, help="a local folder of DINOv3/DINOv2 weights instead")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--slices", type=int, default=155, help="slices of the query volume (default: 155)")
    parser.add_argument("--in-plane", type=int, default=240, help="slice size of the synthetic volumes (square)")
    parser.add_argument("--reference-slices", type=int, default=None,
                        help="slices of each of the 2 reference volumes of the end-to-end bank (default: --slices)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 64 on CUDA")
    parser.add_argument("--planes", nargs="+", default=None, metavar="PLANE",
                        help="tri-planar detection for the end-to-end part and its bank: all, or axial coronal "
                             "sagittal (default: the package's, axial only)")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default=None,
                        help="the backbone's arithmetic (default: the package's, auto: bf16 on CUDA and on CPUs "
                             "with native bf16)")
    parser.add_argument("--calibration-slices", type=int, default=None, help="default: the method's (512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed end-to-end runs of each; the fastest counts")
    parser.add_argument("--bank-slices", type=int, nargs="*", default=[100], metavar="N",
                        help="bank sizes to build by phase (default: 100; e.g. 100 2000 10000; none to skip)")
    parser.add_argument("--bank-images", type=int, nargs="*", default=[], metavar="N",
                        help="also build banks of N 2D images (one-slice references, like a 2D set) by phase")
    parser.add_argument("--large-bank-slices", type=int, default=0,
                        help="slices of the synthetic large bank (e.g. 10000; default 0: skipped)")
    parser.add_argument("--screen-volumes", type=int, default=0, metavar="N",
                        help="also screen a cohort of N synthetic volumes of --slices slices (reading and writing "
                             "overlapped with the backbone by --workers processes) against the backbone-only "
                             "throughput of the same slices (default 0: skipped; e.g. 32)")
    parser.add_argument("--workers", type=int, default=2, help="reader processes of the screening part (default: 2)")
    parser.add_argument("--compile-trial", action="store_true",
                        help="also time the backbone compiled by torch.compile against eager on the end-to-end "
                             "volume's batches, and compare their outputs (the package does not compile)")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only the bank, screening and compile parts")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures here")
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true",
                         help="no progress and no summaries on stderr (the figures stay on stdout)")
    chatter.add_argument("-v", "--verbose", action="store_true",
                         help="also the settings and the phases of every timed run on stderr")
    parser.add_argument("--version", action="version", version=f"himatch-med {_version()}")
    return parser


def _version() -> str:
    # Read from the package being measured (``PYTHONPATH=old/``: the older one's), without importing torch.
    from himatch_med import __version__

    return __version__


def check(args: argparse.Namespace) -> None:
    """Refuse bad options before anything heavy is imported."""
    if args.model is not None and not (args.model / "config.json").is_file():
        sys.exit(f"error: --model {args.model}: not a folder with a config.json (a saved DINOv3/DINOv2)")
    if args.json is not None:
        folder = args.json.resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            sys.exit(f"error: --json {args.json}: its folder {folder} does not exist or cannot be written")
    if args.screen_volumes < 0 or args.workers < 0:
        sys.exit("error: --screen-volumes, --workers: use 0 or more")
    for name in ("image_size", "slices", "in_plane", "repeats"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if any(n < 2 for n in args.bank_slices + args.bank_images):
        sys.exit("error: --bank-slices, --bank-images: a bank needs at least 2 slices")


LOGGER = logging.getLogger("himatch_med.benchmark")
"""The benchmark's lines on stderr (stdout carries only the JSON figures): progress and summaries at INFO."""


def say(text: str, level: int = logging.INFO) -> None:
    """Write a line of progress to stderr, unless ``-q`` (or, for ``logging.DEBUG``, without ``-v``)."""
    LOGGER.log(level, text)


def random_dinov3(size: str, folder: Path) -> Path:
    """Save a random-initialised DINOv3 of the given size (4 registers, patch 16) with save_pretrained."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    hidden, heads, depth = SIZES[size]
    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads,
                             num_hidden_layers=depth, num_register_tokens=4, patch_size=16)
    from transformers.utils import logging as transformers_logging

    # Saving a few MB of random weights is not progress worth a bar on the benchmark's stderr.
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        DINOv3ViTModel(config).save_pretrained(folder)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
    return folder


def synthetic_brain(shape: tuple[int, int, int], seed: int, *, reach: float = 0.85):
    """A textured ellipsoid on an exact-zero background (int16, like a skull-stripped MRI).

    ``reach``: its half-length along the slice axis, as a fraction of the volume's (above 1.1 every slice is scored).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    inside = (axes[0] / 0.85) ** 2 + (axes[1] / 0.85) ** 2 + (axes[2] / reach) ** 2 < 1
    texture = 600 + 200 * np.sin(axes[0] * 19) * np.cos(axes[1] * 13) + 80 * np.sin(axes[2] * 7)
    return ((texture + rng.normal(0, 20, shape)) * inside).astype(np.int16)


def save(array, path: Path) -> Path:
    """Write ``array`` as a NIfTI with a brain MRI's affine; returns ``path``."""
    import nibabel as nib
    import numpy as np

    affine = np.diag([-0.9375, -0.9375, 1.0, 1.0])  # LPS-stored 240 x 240 at 0.94 mm, like many brain MRIs
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def peak_host_mib() -> float:
    """The peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(field: str) -> float:
    """A field of /proc/self/status in MiB: VmRSS (resident), RssAnon (private, not file-backed)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """The highest resident and private memory while the block runs (sampled every 20 ms), above its start."""

    def __enter__(self) -> PeakMemory:
        self.start = {f: status_mib(f) for f in ("VmRSS", "RssAnon")}
        self.peak = dict(self.start)
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            for field in self.peak:
                self.peak[field] = max(self.peak[field], status_mib(field))
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    def figures(self) -> dict:
        """The growth of the peaks above the start, in MiB."""
        return {"peak_rss_growth_mib": round(self.peak["VmRSS"] - self.start["VmRSS"], 1),
                "peak_anonymous_growth_mib": round(self.peak["RssAnon"] - self.start["RssAnon"], 1)}


def synchronizer(device):
    """A function that waits for the device's work to finish (CUDA), or None on the CPU."""
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def backbone_images(prepared, settings, extractor, device) -> tuple[tuple[int, int], list]:
    """The backbone's image size and input batches for a prepared volume's scored slices (the backbone-only runs)."""
    import torch

    from himatch_med.transforms import to_backbone_images
    from himatch_med.volume import backbone_size

    height, width = prepared.slices.shape[1:]
    size = backbone_size(height, width, image_size=settings.image_size, patch_size=extractor.patch_size)
    scored = torch.nonzero(prepared.scored).flatten()
    return size, [to_backbone_images(prepared.slices[part].to(device), size)
                  for part in scored.split(settings.batch_size)]


def end_to_end(args, settings, device, work: Path) -> dict:
    """Time one volume through the whole job by phase, against the backbone alone on the same slices."""
    import torch

    from himatch_med import jobs
    from himatch_med.bank.build import build_bank
    from himatch_med.detect import Detector, load_extractor
    from himatch_med.timing import Timer

    timer_sync = synchronizer(device)
    say("end to end: loading the model and writing the volumes")
    started = time.perf_counter()
    extractor = load_extractor(settings, str(device))
    model_load = time.perf_counter() - started
    shape = (args.in_plane, args.in_plane, args.slices)
    reference_shape = (args.in_plane, args.in_plane, args.reference_slices or args.slices)
    references = [save(synthetic_brain(reference_shape, seed), work / f"normal{seed}.nii.gz") for seed in (1, 2)]
    query = save(synthetic_brain(shape, 3), work / "query.nii.gz")

    say(f"end to end: building the bank of 2 x {reference_shape[2]} slices")
    started = time.perf_counter()
    if getattr(settings, "planes", ()):
        from himatch_med.bank.build import build_planes

        bank = build_planes(extractor, lambda plane: ((str(p), jobs.read(p, plane).prepared) for p in references),
                            settings)
    else:  # an older checkout has no planes
        bank = build_bank(extractor, ((str(p), jobs.read(p, settings).prepared) for p in references), settings)
    bank_seconds = time.perf_counter() - started
    bank = bank.to(device)
    detector = Detector(extractor, bank, settings)

    # Warm-up: a short volume through the whole job (imports, first calls, allocator), so that neither timed run
    # pays for first-call costs.
    say("end to end: warm-up")
    # With --planes a thin warm-up volume would be cut into very wide coronal and sagittal slices: a small one of
    # the query's proportions then.
    warm_shape = ((args.in_plane, args.in_plane, settings.batch_size) if not getattr(settings, "planes", ())
                  else (max(16, args.in_plane // 4),) * 2 + (max(16, args.slices // 4),))
    warm = save(synthetic_brain(warm_shape, 4), work / "warm.nii.gz")
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
        size, images = backbone_images(prepared, settings, extractor, device)
        backbone_runs.append(timed(lambda images=images: [extractor(batch) for batch in images]))
        say(f"end to end: run {repeat + 1}/{args.repeats}: {runs[-1]:.2f} s, backbone alone {backbone_runs[-1]:.2f} s")
        say(f"end to end: run {repeat + 1} phases {dict(timer.seconds)}", logging.DEBUG)
    total, backbone_only = min(runs), min(backbone_runs)
    timer = timers[runs.index(total)]
    report = outcome["report"]

    phases = {phase: round(timer.seconds.get(phase, 0.0), 3) for phase in PHASES}
    slices = int(prepared.scored.sum())
    result = {
        "backbone_image": list(size), "volume_shape": list(shape), "scored_slices": slices,
        "model_load_seconds": round(model_load, 3), "phases_seconds": phases,
        "end_to_end_seconds": round(total, 3), "backbone_only_seconds": round(backbone_only, 3),
        "runs_seconds": {"end_to_end": [round(r, 3) for r in runs],
                         "backbone_only": [round(r, 3) for r in backbone_runs]},
        "ratio_to_backbone": round(total / backbone_only, 3),
        # Against the backbone phase of the same run: free of the separate backbone-alone runs' noise (on a shared
        # CPU they vary by 10-20 %, more than everything outside the backbone), so steadier for before/after.
        "outside_backbone_seconds": round(total - phases["backbone"], 3),
        "ratio_to_own_backbone": round(total / phases["backbone"], 3) if phases["backbone"] else None,
        # With --planes the job also cuts and scores the other planes; the backbone alone runs the axial slices only,
        # so compare the end-to-end times of --planes all and of the default run for what the planes cost.
        "backbone_only_planes": ["axial"],
        "slices_per_second": round(slices / total, 2), "backbone_slices_per_second": round(slices / backbone_only, 2),
        "bank_build": {"volumes": 2, "slices": len(bank), "seconds": round(bank_seconds, 3),
                       "slices_per_second": round(len(bank) / bank_seconds, 2)},
        "peak_host_mib": round(peak_host_mib(), 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "volume_score": report["volume_score"],
    }
    say(f"end to end: {total:.3f} s, backbone only {backbone_only:.3f} s (axial slices), ratio "
        f"{result['ratio_to_backbone']}; over the same run's backbone {result['ratio_to_own_backbone']} "
        f"({result['outside_backbone_seconds']:.3f} s outside it); phases {phases}")
    return result


def bank_building(args, settings, device, work: Path, slices: int, extractor, *, images: bool = False) -> dict:
    """Build a bank of ``slices`` synthetic reference slices by phase.

    The references are volumes of at most ``--slices`` slices (at least 2 volumes), or with ``images`` one-slice
    volumes, as a 2D set is read.
    """
    import inspect

    import torch
    from tqdm.auto import tqdm

    from himatch_med import io
    from himatch_med.bank.build import build_bank
    from himatch_med.detect import prepare
    from himatch_med.timing import Timer

    length = 1 if images else min(args.slices, -(-slices // 2))
    counts = [min(length, slices - start) for start in range(0, slices, length)]
    timer = Timer(synchronizer(device))
    made = [0.0]

    def references():
        for number, count in enumerate(counts):
            started = time.perf_counter()
            # Made in memory, not part of the cost; preparing them (intensities, foreground, slicing) is.
            if images:  # a middle slice of a volume of its own, so that the images differ like real ones
                volume = synthetic_brain((args.in_plane, args.in_plane, 3), 100 + number)[..., 1:2]
            else:
                volume = synthetic_brain((args.in_plane, args.in_plane, count), 100 + number, reach=1.3)
            volume = torch.from_numpy(volume.astype("float32"))
            made[0] += time.perf_counter() - started
            with timer("prepare"):
                prepared = prepare(volume, settings)
            yield f"synthetic{number}", prepared

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kind = "images" if images else "slices"
    bar = tqdm(total=slices, unit="slice", desc=f"bank of {slices} {kind}", file=sys.stderr, leave=False,
               disable=args.quiet)
    with PeakMemory() as memory:
        started = time.perf_counter()
        # Older versions of the package (before/after comparisons) take no timer: their phases are not split.
        timed = {"timer": timer} if "timer" in inspect.signature(build_bank).parameters else {}
        bank = build_bank(extractor, references(), settings, progress=bar.update, **timed)
        with timer("writing"):
            io.write_bank(bank.tensors(), bank.metadata, work / f"bank{slices}")
        total = time.perf_counter() - started - made[0]
    bar.close()
    phases = {phase: round(timer.seconds.get(phase, 0.0), 3) for phase in BANK_PHASES}
    backbone = timer.seconds.get("backbone", 0.0)
    result = {"kind": kind, "slices": len(bank), "references": len(counts), "seconds": round(total, 3),
              "phases_seconds": phases,
              "other_seconds": round(total - sum(timer.seconds.values()), 3),
              "ratio_to_backbone": round(total / backbone, 3) if backbone else None,
              "slices_per_second": round(len(bank) / total, 2), **memory.figures(),
              "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
              if device.type == "cuda" else None}
    say(f"bank of {len(bank)} {kind}: {total:.2f} s, {result['ratio_to_backbone']} x the backbone; phases {phases}; "
        f"peak memory +{result['peak_rss_growth_mib']} MiB")
    return result


def screening_throughput(args, settings, device, work: Path, extractor) -> dict:
    """Screen ``--screen-volumes`` synthetic volumes; the backbone alone on the same slices, for the ratio.

    Screening reads the next volumes in ``--workers`` processes and writes each study's files while the backbone
    works on the next, so its throughput should come close to the backbone's: the ratio shows how much of the I/O
    stays hidden.
    """
    from himatch_med import jobs, screening
    from himatch_med.bank.build import build_bank
    from himatch_med.detect import Detector

    timer_sync = synchronizer(device)
    count = args.screen_volumes
    cohort = work / "cohort"
    cohort.mkdir()
    shape = (args.in_plane, args.in_plane, args.slices)
    say(f"screening: writing {count} volumes of {shape} and a bank of 2 references")
    paths = [save(synthetic_brain(shape, 1000 + i), cohort / f"study{i:03d}.nii.gz") for i in range(count)]
    references = [save(synthetic_brain(shape, seed), work / f"screen_normal{seed}.nii.gz") for seed in (1, 2)]
    bank = build_bank(extractor, ((str(p), jobs.read(p, settings).prepared) for p in references), settings)
    detector = Detector(extractor, bank.to(device), settings)
    studies = screening.read_cohort([cohort])
    if timer_sync:
        timer_sync()
    started = time.perf_counter()
    result = screening.screen(studies, detector, work / "screening", workers=args.workers,
                              progress=not args.quiet)
    if timer_sync:
        timer_sync()
    seconds = time.perf_counter() - started
    if result.count("ok") != count:
        raise RuntimeError(f"screening: only {result.count('ok')} of {count} studies were screened")

    say("screening: the backbone alone on the same slices")
    backbone_seconds, slices = 0.0, 0
    for path in paths:
        prepared = jobs.read(path, settings).prepared  # reading is not counted: only the backbone's own time
        images = backbone_images(prepared, settings, extractor, device)[1]
        slices += int(prepared.scored.sum())
        if timer_sync:
            timer_sync()
        begun = time.perf_counter()
        for batch in images:
            extractor(batch)
        if timer_sync:
            timer_sync()
        backbone_seconds += time.perf_counter() - begun
    figures = {"volumes": count, "volume_shape": list(shape), "scored_slices": slices, "workers": args.workers,
               "seconds": round(seconds, 3), "backbone_only_seconds": round(backbone_seconds, 3),
               "volumes_per_second": round(count / seconds, 3), "slices_per_second": round(slices / seconds, 2),
               "backbone_slices_per_second": round(slices / backbone_seconds, 2),
               "throughput_ratio_to_backbone": round(backbone_seconds / seconds, 3)}
    say(f"screening: {count} volumes in {seconds:.2f} s ({figures['slices_per_second']} slices/s), backbone alone "
        f"{backbone_seconds:.2f} s: throughput {figures['throughput_ratio_to_backbone']} x the backbone's")
    return figures


def compile_trial(args, settings, device, work: Path) -> dict:
    """The backbone compiled by ``torch.compile`` (inductor) against eager, on the end-to-end volume's batches.

    Reports the first pass (the compile: inductor caches its graphs on disk, so a second process shows what a later
    run pays), the fastest of ``--repeats`` passes of each, and how far the compiled outputs are from eager's (the
    largest absolute difference of any CLS or stage-grid component; both are unit vectors). The package itself does
    not compile: this part is there to decide whether it should.
    """
    import torch

    from himatch_med import jobs
    from himatch_med.detect import load_extractor

    timer_sync = synchronizer(device)

    def timed(job) -> float:
        if timer_sync:
            timer_sync()
        started = time.perf_counter()
        job()
        if timer_sync:
            timer_sync()
        return time.perf_counter() - started

    extractor = load_extractor(settings, str(device))
    query = save(synthetic_brain((args.in_plane, args.in_plane, args.slices), 3), work / "compile_query.nii.gz")
    size, images = backbone_images(jobs.read(query, settings).prepared, settings, extractor, device)
    eager = [extractor(batch) for batch in images]  # also the warm-up of the eager runs
    eager_seconds = min(timed(lambda: [extractor(batch) for batch in images]) for _ in range(args.repeats))
    model = extractor.model
    say(f"compile: compiling the backbone for {len({tuple(b.shape) for b in images})} batch shapes of {size}")
    extractor.model = torch.compile(model, dynamic=False)
    try:
        compiled = []
        compile_seconds = timed(lambda: compiled.extend(extractor(batch) for batch in images))
        compiled_seconds = min(timed(lambda: [extractor(batch) for batch in images]) for _ in range(args.repeats))
    finally:
        extractor.model = model

    def largest(pairs) -> float:
        return max(float((a - b).abs().max()) for a, b in pairs)

    stages = len(eager[0][1])
    figures = {"backbone_image": list(size), "batches": len(images), "first_pass_seconds": round(compile_seconds, 3),
               "eager_seconds": round(eager_seconds, 3), "compiled_seconds": round(compiled_seconds, 3),
               "speedup": round(eager_seconds / compiled_seconds, 3),
               "max_abs_difference": {
                   "cls": largest((e[0], c[0]) for e, c in zip(eager, compiled)),
                   "stages": [largest((e[1][i], c[1][i]) for e, c in zip(eager, compiled)) for i in range(stages)]},
               "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "the default (/tmp/torchinductor_USER)"}
    say(f"compile: first pass {compile_seconds:.2f} s; eager {eager_seconds:.3f} s, compiled {compiled_seconds:.3f} s "
        f"({figures['speedup']} x); largest difference {figures['max_abs_difference']}")
    return figures


def large_bank(args, device, work: Path) -> dict:
    """A synthetic ViT-B bank: size on disk, open time, query time and memory against a bank of 1,000."""
    import torch

    from himatch_med import io
    from himatch_med.bank.data import Bank, BankInfo
    from himatch_med.config import Settings
    from himatch_med.detect import stage_distances
    from himatch_med.features import Features

    n, stages, cents, dim, cells = args.large_bank_slices, 4, 32, 768, 16
    generator = torch.Generator().manual_seed(0)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1).half()

    say(f"large bank: writing {n} synthetic slices")
    tensors = {
        "cls": unit(n, dim), "layout": unit(n, cells, dim), "centroids": torch.empty(n, stages, cents, dim,
                                                                                     dtype=torch.float16),
        "sizes": torch.ones(n, stages, cents, dtype=torch.int32), "positions": (torch.arange(n) % 155) / 154,
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

    queries, grid = 155, (14, 14)
    features = Features(unit(queries, dim).float(), unit(queries, cells, dim).float(),
                        tuple(unit(queries, *grid, dim).float() for _ in range(stages)))
    features = Features(features.cls.to(device), features.layout.to(device),
                        tuple(g.to(device) for g in features.grids))
    positions = torch.linspace(0, 1, queries)  # the slices of one volume, in order, as a query sends them
    small = Bank(**{name: (t[:1000] if t.dim() and len(t) == n else t) for name, t in bank.tensors().items()},
                 info=bank.info)
    memory = {}
    for window in (0.0, 0.1):
        settings = Settings(model="synthetic", references_k=8, position_window=window).resolved()
        for name, which in (("1000", small), (str(n), bank)):
            gc.collect()
            before = status_mib("RssAnon")
            started = time.perf_counter()
            ready = which.to(device)  # once per run, as a run opens its bank
            ready_seconds = time.perf_counter() - started
            started = time.perf_counter()
            for part in range(0, queries, 16):
                piece = Features(features.cls[part:part + 16], features.layout[part:part + 16],
                                 tuple(g[part:part + 16] for g in features.grids))
                stage_distances(piece, ready, settings, positions[part:part + 16])
            memory[f"{name}_window_{window}"] = {
                "anonymous_growth_mib": round(status_mib("RssAnon") - before, 1),
                "ready_seconds": round(ready_seconds, 3), "query_seconds": round(time.perf_counter() - started, 3)}
            del ready
    say(f"large bank: {n} slices, {disk / 2**30:.2f} GiB, open {timings[False]:.3f} s; 155 query slices {memory}")
    return {"slices": n, "array_bytes": array_bytes, "disk_bytes": disk, "disk_ratio": round(disk / array_bytes, 4),
            "write_seconds": round(write_seconds, 2), "open_seconds": round(timings[False], 3),
            "open_verified_seconds": round(timings[True], 3), "query_155_slices": memory}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints the figures as one JSON line on stdout and returns 0."""
    args = parser().parse_args(argv)
    check(args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = LOGGER.level, LOGGER.propagate
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    LOGGER.propagate = False
    try:
        return measure(args)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
        LOGGER.propagate = propagate


def measure(args: argparse.Namespace) -> int:
    """The benchmark's parts for parsed and checked options; prints the figures and returns 0."""
    say("loading torch and himatch-med")
    import torch

    from himatch_med import io
    from himatch_med.config import Settings
    from himatch_med.detect import device_of, load_extractor

    device = device_of(args.device)
    batch = args.batch_size or (64 if device.type == "cuda" else 16)
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else _cpu_name(), "threads": torch.get_num_threads(), "gzip": getattr(io, "GZIP_LIBRARY", "zlib"),
              "model": str(args.model) if args.model else f"random DINOv3 ViT-{args.backbone_size.upper()}/16",
              "image_size": args.image_size, "batch_size": batch, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="himatch-bench-") as folder:
        work = Path(folder)
        model = args.model or random_dinov3(args.backbone_size, work / "model")
        options = {} if args.calibration_slices is None else {"calibration_slices": args.calibration_slices}
        # Passed only when given: an older checkout has no such settings.
        if args.precision is not None:
            options["precision"] = args.precision
        if args.planes is not None:
            options["planes"] = tuple(args.planes)
        settings = Settings(model=str(model), image_size=args.image_size, batch_size=batch, **options).resolved()
        say(f"settings: {settings}", logging.DEBUG)
        result["calibration_slices"] = settings.calibration_slices
        result["planes"] = list(getattr(settings, "planes", ())) or ["axial"]
        result["precision"] = getattr(settings, "precision", "float32 (no precision setting)")
        if hasattr(settings, "precision"):
            from himatch_med.backbone import arithmetic

            result["arithmetic"] = arithmetic(settings.precision, device)
        if not args.skip_end_to_end:
            result["end_to_end"] = end_to_end(args, settings, device, work)
        if args.bank_slices or args.bank_images:
            extractor = load_extractor(settings, str(device))
            bank_building(args, settings, device, work, 2 * batch, extractor)  # warm-up, not reported
            result["bank_building"] = [bank_building(args, settings, device, work, n, extractor)
                                       for n in args.bank_slices]
            result["bank_building"] += [bank_building(args, settings, device, work, n, extractor, images=True)
                                        for n in args.bank_images]
        if args.screen_volumes:
            extractor = load_extractor(settings, str(device))
            result["screening"] = screening_throughput(args, settings, device, work, extractor)
        if args.large_bank_slices:
            result["large_bank"] = large_bank(args, device, work)
        if args.compile_trial:
            result["compile"] = compile_trial(args, settings, device, work)
    result["peak_host_mib"] = round(peak_host_mib(), 1)
    text = json.dumps(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
