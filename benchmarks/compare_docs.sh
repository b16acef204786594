#!/usr/bin/env bash
# The shipped comparison as docs/compare.md shows it: `peftlab compare` with no config (compare_default.yaml), then
# its table and plots copied into docs/img/ (compare_results.md, compare_*.png). Resumable: rerunning continues
# with the first (method, seed) that has no stored result, then rewrites the report from all of them.
#
#   bash benchmarks/compare_docs.sh [OUTPUT_DIR] [key=value ...]     # default OUTPUT_DIR /tmp/peftlab-compare
#
# ~19 min on an idle 2-core CPU (fp32); run it with `nice` on a shared machine. Extra arguments go to
# `peftlab compare` (e.g. --seeds 3). The plots are copied only when every method finished.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/peftlab-compare}"
shift || true
start=$(date +%s)
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" .venv/bin/peftlab compare "train.output_dir=$out" "$@"
echo "peftlab compare finished in $(( ($(date +%s) - start) / 60 )) min (this call; reused results not counted)"
mkdir -p docs/img
install -m 644 "$out/report/results.md" docs/img/compare_results.md  # readable by all (the report's files are 600)
for name in score_vs_params loss_curves score_vs_cost; do
    install -m 644 "$out/report/$name.png" "docs/img/compare_$name.png"
done
echo "copied the table and plots of $out/report into docs/img/"
