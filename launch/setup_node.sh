#!/usr/bin/env bash
# Installs s4d_dist on one node of a Ray cluster, as the README says (its setup line for CPU
# machines; "GPU nodes" for GPU machines), in the repository's .venv (created where missing).
# launch/sweep.yaml runs `cpu` on its head and `gpu` on its GPU workers; launch/sweep_local.yaml
# runs `auto` on every machine.
#
#   bash launch/setup_node.sh cpu    # constraints.txt: torch's CPU build, DALI's CUDA 12 wheel
#   bash launch/setup_node.sh gpu    # torch's CUDA build for the driver, then constraints-gpu.txt
#                                    # and the DALI wheel of the same CUDA major (dali-cu12/13)
#   bash launch/setup_node.sh auto   # gpu where nvidia-smi answers, else cpu
#
# The CUDA build follows the CUDA version the driver supports (nvidia-smi): 13.x or newer takes
# torch's cu130 wheels and dali-cu13, 12.x takes cu128 and dali-cu12; S4D_TORCH_INDEX names
# another wheel index (its cuXY suffix picks the DALI wheel). A GPU node whose torch cannot see
# the GPU fails here, rather than joining the cluster and training on its CPUs.
# S4D_SETUP_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

run() {
  if [[ ${S4D_SETUP_DRY_RUN:-} == 1 ]]; then
    echo "+ $*"
  else
    "$@"
  fi
}

# The major CUDA version the driver supports, or nothing where there is no working NVIDIA GPU.
driver_cuda() {
  { nvidia-smi 2>/dev/null || true; } | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1
}

kind=${1:-}
case $kind in
  cpu | gpu) ;;
  auto) kind=$([[ -n $(driver_cuda) ]] && echo gpu || echo cpu) ;;
  *) echo "usage: bash launch/setup_node.sh cpu|gpu|auto" >&2; exit 2 ;;
esac

index=${S4D_TORCH_INDEX:-}
if [[ $kind == gpu && -z $index ]]; then
  cuda=$(driver_cuda)
  if [[ -z $cuda ]]; then
    echo "setup_node.sh: no NVIDIA GPU answers nvidia-smi on this GPU node: install the driver (or use an image that has it)" >&2
    exit 1
  elif ((cuda >= 13)); then
    index=https://download.pytorch.org/whl/cu130
  elif ((cuda == 12)); then
    index=https://download.pytorch.org/whl/cu128
  else
    echo "setup_node.sh: the driver supports CUDA $cuda; DALI's wheels need CUDA 12 or 13: update the driver" >&2
    exit 1
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  # Ubuntu's python3 lacks venv until python3-venv is installed.
  if ! run python3 -m venv .venv; then
    run sudo apt-get update -q
    run sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
    run rm -rf .venv
    run python3 -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip)

if [[ $kind == cpu ]]; then
  run "${pip[@]}" install -c constraints.txt -e ".[dev,dali]"
  exit 0
fi
major=$(sed -n 's|.*/cu\([0-9]*[0-9]\)[0-9]/*$|\1|p' <<<"$index")
if [[ $major != 12 && $major != 13 ]]; then
  echo "setup_node.sh: cannot tell the CUDA major version of the torch index $index (…/cu12X or …/cu13X)" >&2
  exit 2
fi
run "${pip[@]}" install torch --index-url "$index"
run "${pip[@]}" install -c constraints-gpu.txt -e ".[dev,dali-cu$major]"
run .venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'torch ' + torch.__version__ + ' sees no GPU'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.device_count(), 'GPU(s)')"
