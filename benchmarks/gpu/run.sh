#!/usr/bin/env bash
# The prepared GPU run (benchmarks/gpu/README.md): installs what benchmarks/gpu/wheels.sh put in
# .gpu/ against the machine's own torch and Triton, then runs benchmarks/gpu/check.py.
#
#   bash benchmarks/gpu/run.sh --sections A,C,B,D   # GPU: check sections (default: all)
#   bash benchmarks/gpu/run.sh --stage-only         # GPU: only keep the carried DALI piece
#   bash benchmarks/gpu/run.sh --cpu-smoke          # CPU: the same checks at toy sizes
#
# Results: $OUT/gpu_<device>.json and $OUT/logs.tgz (the device tool returns at most 8 files
# from $OUT, so every log and benchmark report travels in the one archive).
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=${S4D_GPU_STAGE:-/tmp/s4d_gpu}
SITE=$STAGE/site
OUT=${OUT:-$STAGE/result}
mode=gpu
sections=A,B,C,D,E,F,G
while (($#)); do
  case $1 in
    --cpu-smoke) mode=smoke ;;
    --stage-only) mode=stage ;;
    --sections) sections=$2; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$STAGE/pieces" "$STAGE/out" "$SITE" "$OUT"

if [[ $mode != smoke ]]; then
  # Carried wheels (no index, no dependencies: the image's torch, numpy, Triton stay).
  for dir in .gpu/wheels .gpu/av; do
    if compgen -G "$dir/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
        "$dir"/*.whl 2>&1 | grep -v "WARNING: Target directory" || true
    fi
  done
  # DALI travels in pieces over several calls; unpack once all of them are here and verified.
  cp .gpu/dali/SHA256SUMS .gpu/dali/*.part-* "$STAGE/pieces/" 2>/dev/null
  if [[ ! -f $STAGE/dali.done && -f $STAGE/pieces/SHA256SUMS ]] &&
     (cd "$STAGE/pieces" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1); then
    cat "$STAGE"/pieces/*.part-* | xz -d | tar -x -C "$SITE" && touch "$STAGE/dali.done"
  fi
  echo "staged: $(ls "$STAGE/pieces" | grep -c part-) DALI piece(s), DALI unpacked: $([[ -f $STAGE/dali.done ]] && echo yes || echo no)"
  [[ $mode == stage ]] && exit 0
fi

# The project without installing it: a package folder of links, so s4d_dist.kernels and
# s4d_dist.shards resolve as setup.py maps them (kernels/ and shards/ at the top level).
pkg=$STAGE/pkg/s4d_dist
rm -rf "$STAGE/pkg" && mkdir -p "$pkg"
for entry in s4d_dist/*; do ln -s "$PWD/$entry" "$pkg/"; done
ln -s "$PWD/kernels" "$pkg/kernels" && ln -s "$PWD/shards" "$pkg/shards"
export PYTHONPATH=$STAGE/pkg:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1

# Run from outside the repository: there `python -c` (forkserver / DataLoader workers) and
# `python -m` put the source folder s4d_dist/ first on sys.path, ahead of the linked package.
check=$PWD/benchmarks/gpu/check.py
mkdir -p "$STAGE/scratch"
if [[ $mode == smoke ]]; then
  export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu
  (cd "$STAGE/scratch" && python3 "$check" --smoke --sections "$sections" --out "$STAGE/out" \
    --scratch "$STAGE/scratch")
else
  (cd "$STAGE/scratch" && python3 "$check" --sections "$sections" --out "$STAGE/out" \
    --scratch "$STAGE/scratch")
fi
status=$?
cp "$STAGE"/out/gpu_*.json "$OUT/"
tar -czf "$OUT/logs.tgz" -C "$STAGE/out" --exclude 'gpu_*.json' .
exit $status
