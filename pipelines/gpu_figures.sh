#!/usr/bin/env bash
# Issue 16's GPU figures in one run (README, "Performance"): on a machine with a CUDA device,
#   1. one 240 x 240 x 155 volume end to end with a random DINOv3 ViT-B/16 at 448 px in bf16, against the backbone
#      alone (5 timed runs after a warm-up), bank building at 2,000 slices, and a cohort of 32 volumes screened
#      against the backbone alone on the same slices            -> gpu.json, gpu.log
#   2. the backbone compiled by torch.compile against eager, twice, each in a new process: the second shows what
#      the compile costs once inductor's on-disk cache holds it  -> compile1.json, compile2.json, compile.log
#
#   pipelines/gpu_figures.sh wheels   here, with PyPI: the packages the GPU machine's Python 3.12 lacks, into .whl/
#   pipelines/gpu_figures.sh [FOLDER] there: the figures into FOLDER (default: $OUT, else ./gpu-figures)
#
# The device tool's machine has PyTorch, transformers, scipy and matplotlib but not monai, nibabel, SimpleITK,
# pydicom or isal: `wheels` fetches those (58 MiB; name .whl in the run's carry); the run installs
# them into /tmp/site when they are missing. GPU_FIGURES_DEVICE=cpu GPU_FIGURES_QUICK=1 runs every part at toy
# sizes on a CPU: a check of the script itself, whose figures mean nothing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "${1:-}" == "wheels" ]]; then
    mkdir -p "$repo/.whl"  # ignored by git (.gitignore): the device tool's run takes it with carry=[".whl"]
    for package in monai nibabel SimpleITK pydicom isal; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$repo/.whl" "$package"
    done
    du -sh "$repo/.whl"
    exit 0
fi

out="${1:-${OUT:-$repo/gpu-figures}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
device="${GPU_FIGURES_DEVICE:-cuda}"
if [[ "$device" == cuda* ]] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_figures.sh: $python's torch sees no CUDA device; run this on the GPU machine" >&2
    exit 1
fi
if ! "$python" -c 'import monai, nibabel, SimpleITK, pydicom' 2>/dev/null; then
    if ! compgen -G "$repo/.whl/*.whl" > /dev/null; then
        echo "gpu_figures.sh: monai, nibabel, SimpleITK or pydicom is missing and there is no .whl/ to install" \
             "them from; run 'pipelines/gpu_figures.sh wheels' where PyPI can be reached, and carry .whl" >&2
        exit 1
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$repo"/.whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# One cache for both compile runs, kept apart from anything else on the machine.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/himatch-inductor}"

if [[ -n "${GPU_FIGURES_QUICK:-}" ]]; then
    size=(--backbone-size s --image-size 32 --slices 8 --in-plane 64 --repeats 1)
    parts=(--bank-slices 16 --screen-volumes 2 --workers 1)
else
    size=(--backbone-size b --image-size 448 --slices 155 --in-plane 240 --repeats 5)
    parts=(--bank-slices 2000 --screen-volumes 32 --workers 8)
fi
benchmark=("$python" "$repo/pipelines/benchmark.py" "${size[@]}" --device "$device" --precision bfloat16)

"${benchmark[@]}" "${parts[@]}" --json "$out/gpu.json" -v 2> "$out/gpu.log" > /dev/null \
    || { tail -n 20 "$out/gpu.log" >&2; exit 1; }
for run in 1 2; do
    "${benchmark[@]}" --skip-end-to-end --bank-slices --compile-trial --json "$out/compile$run.json" \
        2>> "$out/compile.log" > /dev/null || { tail -n 20 "$out/compile.log" >&2; exit 1; }
done
"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
figures = json.loads((out / "gpu.json").read_text())
end, bank, screen = figures["end_to_end"], figures["bank_building"][0], figures["screening"]
print(f"{figures['device_name']}, {figures['model']} at {figures['image_size']} px, {figures['arithmetic']}, "
      f"{figures['date']}")
print(f"end to end: {end['end_to_end_seconds']} s, backbone alone {end['backbone_only_seconds']} s, "
      f"ratio {end['ratio_to_backbone']} (targets: <= 0.5 s, <= 1.25)")
print(f"bank of {bank['slices']} slices: {bank['seconds']} s, {bank['ratio_to_backbone']} x its backbone")
print(f"screening {screen['volumes']} volumes: {screen['slices_per_second']} slices/s, "
      f"{screen['throughput_ratio_to_backbone']} x the backbone's throughput (target >= 0.8)")
for run in (1, 2):
    trial = json.loads((out / f"compile{run}.json").read_text())["compile"]
    print(f"torch.compile, process {run}: first pass {trial['first_pass_seconds']} s, eager {trial['eager_seconds']} "
          f"s, compiled {trial['compiled_seconds']} s ({trial['speedup']} x), largest difference "
          f"{max([trial['max_abs_difference']['cls'], *trial['max_abs_difference']['stages']]):.2g}")
EOF
