#!/usr/bin/env bash
# Prepare what must travel to a lent GPU machine (Python 3.12, its own torch/Triton, no network)
# for benchmarks/gpu/run.sh, in .gpu/ at the repository root (git-ignored):
#   .gpu/wheels/  DeepSpeed (built here as a py3-none-any wheel from its sdist), OmegaConf,
#                 pydantic and its parts, hjson, WebDataset, braceexpand, typing-extensions
#   .gpu/av/      PyAV (encodes the synthetic VP9/MJPEG shards; the torch fallback decodes them)
#   .gpu/dali/    DALI for CUDA 13 with nvImageCodec + nvJPEG, trimmed to the Python 3.12
#                 binaries, as one tar.xz split into pieces of at most 60 MiB, plus SHA256SUMS
# A call carries at most 64 MiB with the working tree, so the pieces travel in back-to-back
# calls; the printed sequence says which. Idempotent: existing files are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.gpu
PY=${PYTHON:-python3}
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
          --platform manylinux_2_34_x86_64)
download() { "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
mkdir -p "$OUT/wheels" "$OUT/av" "$OUT/dali"

# 1. Small wheels: what the training code imports beyond the image's torch/numpy/tensorboard.
download "$OUT/wheels" omegaconf==2.4.0 webdataset==1.0.2 braceexpand hjson \
  pydantic annotated-types typing-inspection "typing-extensions>=4.16"
core=$(unzip -p "$OUT"/wheels/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==//p')
download "$OUT/wheels" "pydantic-core==$core"
if ! ls "$OUT"/wheels/deepspeed-*.whl >/dev/null 2>&1; then
  # DeepSpeed ships an sdist only; its setup imports torch, so build with an interpreter that has it.
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: deepspeed==0.19.8 -d "$tmp" 2>&1 | grep -v "^WARNING" || true
  BUILDER=${BUILD_PYTHON:-.venv/bin/python}
  DS_BUILD_OPS=0 "$BUILDER" -m pip wheel -q --no-deps --no-build-isolation "$tmp"/deepspeed-*.tar.gz -w "$OUT/wheels"
  rm -rf "$tmp"
fi

# 2. PyAV (~35 MiB): travels with the first call; sections E-G encode shards with it.
download "$OUT/av" av==18.1.0

# 3. DALI: unpacked, trimmed to cp312, compressed. nvcomp is left out: DALI loads it with dlopen
#    only for operators we do not use (inflate, nvTIFF). The archive is cut so that the first
#    piece fills what call 1 leaves beside the wheels and PyAV, the others 62 MiB each (a call
#    carries 64 MiB with the ~1 MiB working tree).
if ! ls "$OUT"/dali/dali_site.tar.xz.part-* >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  download "$tmp" nvidia-dali-cuda130==2.4.0 "nvidia-nvimgcodec-cu13>=0.9,<0.10" "nvidia-nvjpeg>=13,<14" \
    nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 astunparse gast optree nvtx makefun "libcst~=1.8"
  mkdir "$tmp/site"
  for wheel in "$tmp"/*.whl; do unzip -q -o "$wheel" -d "$tmp/site"; done
  find "$tmp/site" -name '*cpython-3*' ! -name '*cpython-312-*' -delete
  tar -C "$tmp/site" -cf - . | xz -T0 -8 > "$tmp/dali_site.tar.xz"
  MiB=$((1024 * 1024))
  used=$(cat "$OUT"/wheels/* "$OUT"/av/* | wc -c)
  first=$((61 * MiB - used))
  head -c "$first" "$tmp/dali_site.tar.xz" > "$OUT/dali/dali_site.tar.xz.part-00"
  tail -c +"$((first + 1))" "$tmp/dali_site.tar.xz" |
    split -b 62M -d -a 2 --numeric-suffixes=1 - "$OUT/dali/dali_site.tar.xz.part-"
  (cd "$OUT/dali" && sha256sum dali_site.tar.xz.part-* > SHA256SUMS)
  rm -rf "$tmp"
fi

du -sh "$OUT"/wheels "$OUT"/av "$OUT"/dali/* | sed 's/^/  /'
pieces=("$OUT"/dali/dali_site.tar.xz.part-*)
last=$((${#pieces[@]} - 1))
echo
echo "Device calls, back to back (the machine goes back ~30 s after a call); each carries .gpu/dali/SHA256SUMS too:"
echo "  1. carry .gpu/wheels .gpu/av ${pieces[0]}"
echo "     command: bash benchmarks/gpu/run.sh --sections A,C,B,D"
for i in $(seq 1 "$last"); do
  if (( i < last )); then
    echo "  $((i + 1)). carry ${pieces[$i]}   command: bash benchmarks/gpu/run.sh --stage-only"
  else
    echo "  $((i + 1)). carry ${pieces[$i]}   command: bash benchmarks/gpu/run.sh --sections F,E,G"
  fi
done
