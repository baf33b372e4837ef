#!/usr/bin/env bash
# Pre-registered 2026-12-07 00:35 UTC (issue 27), before any encoder named here was trained or probed. The outcome
# goes to docs/log/2026-12-06-teachers.md.
#
# 1. The llm arm, 3 seeds. p1's stage 2 (the llm arm's seed 1, p1-boost-s1) was lost with runs/; the best stage 2 we
#    have is c29's (experiments/prereg/issue29-gates.sh: p1's mix plus 512 spatial conversations on images stage 3
#    never sees; its critic reads point depth at AbsRel 0.282, where no stage 2 before it was measured). Stage 3 from
#    it exactly as boost.sh ran p1's (the teachers' images and conversations, data/b15/spatial: 128, seed 301, 16 steps
#    of 8, lr 2e-4, dual channel, point tokens), seeds 1-3: runs/teach-llm-c29-s{1,2,3}. p1-boost-s1 stays beside it
#    as its own one-seed row (another stage 2), never pooled with these.
# 2. >= 1,000 images for the depth teachers: experiments/teachers.sh with N=1024 GB=32 (data/teachers/spatial-1024,
#    seed 301: its first 128 images are the 128 above), 32 steps of 32, everything else as at 128:
#    runs/teach1k-depth-dense-dual-s{1,2,3}, then (second, if this session's time allows; said either way)
#    runs/teach1k-depth-points-dual-s{1,2,3}.
# Probing: issue 27's protocol on probe sets 201, 202, 203 (as experiments/prereg/issue27-teachers.sh; one encoder
# per eval.py call, experiments/prereg/issue27-split-run.sh worker), the baseline's reports reused (the probes are
# deterministic: boost_report.py checks a shared encoder's per-image results agree).
# Primary: depth lin.1 RMSE, mean over (seed, probe set) +- 2 se. Questions: (1) where does the llm arm fall against
# the baseline and against depth-points / depth-dense at 128 (results/teachers/teachers-table-128); (2) does the
# ceiling grow with 8x the images: depth-dense at 1,024 minus depth-dense at 128, and the 1,024 arms against the
# baseline (results/teachers/teachers-dual-1024). Beside them: lin.4, mIoU, linear, k-NN. Reading: a difference
# outside 2 se is a result; inside, not.
# Amended 01:05 UTC, after one lead (teach-llm-c29-s1 on set 201: lin.1 0.631 against the baseline's 0.654) and
# before any other llm encoder was probed or any control trained: (3) the llm arm's matched control, its conversations
# with shuffled images (train.py --shuffle-images, as boost.sh's control), seeds 1-3: runs/teach-llm-c29-control-s*,
# probed as item 3 was (seed k on set 200 + k: what fits this session), reported as llm minus control on those pairs
# (results/teachers/teachers-llm-control-128, --some-seeds-per-set). Reading: the llm arm's change comes from the
# images only where llm - control is outside 2 se. The depth-points teachers at 1,024 trained (00:45-01:08) but are
# probed only if time is left after this.
#
#   bash experiments/prereg/issue27-llm-1k.sh train-llm      # the llm arm (one thread)
#   bash experiments/prereg/issue27-llm-1k.sh train-control  # its shuffled-image control
#   bash experiments/prereg/issue27-llm-1k.sh train-1k [ARM] # the depth teachers at 1,024 (default depth-dense)
#   WAIT=1 bash experiments/prereg/issue27-split-run.sh worker   # probing (two of them), then:
#   bash experiments/prereg/issue27-split-run.sh report-llm-1k
source "$(dirname "$0")/../usage.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

case "${1:-}" in
  train-llm|train-control)
    control=$([ "$1" = train-control ] && echo -control || true)
    for seed in 1 2 3; do
      name=teach-llm-c29$control-s$seed
      [ -f "runs/$name/stage3/config.json" ] && continue
      resume=$([ -d "runs/$name/stage3" ] && echo --resume || true)
      python train.py --preset small --batch-size 4 --workers 1 --save-every 20 --no-probe --dtype bf16 \
        --name "$name" --stage 3 --init runs/c29/stage2 --global-batch 8 --data data/b15/spatial --seed "$seed" \
        --lr 2e-4 --point-tokens ${control:+--shuffle-images} $resume 2>&1 | tee -a "runs/$name.log"
    done ;;
  train-1k)
    D=data/teachers/spatial-1024
    [ -f "$D/data.jsonl" ] || python data.py spatial --n 1024 --out "$D" --seed 301 --size 224 --workers 1
    ARMS=${2:-depth-dense} N=1024 GB=32 DATA=$D TAG=teach1k PROBE=0 bash experiments/teachers.sh ;;
  *) echo "usage: $0 train-llm|train-control|train-1k [ARM]" >&2; exit 2 ;;
esac
