#!/usr/bin/env bash
# Run every benchmark one after another (timings need a quiet machine) and collect the tables
# in benchmarks/RESULTS.md. About 40-60 minutes on a 2-core CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=benchmarks/RESULTS.md
{
  echo "# Benchmark results"
  echo
  echo "Made by \`benchmarks/run_all.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load before start: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
} > "$out"
run() {
  echo "## $1" >> "$out"; echo >> "$out"
  echo '```' >> "$out"; echo "\$ ${*:2}" >> "$out"; echo '```' >> "$out"
  "${@:2}" 2>&1 | tee /tmp/bench-last.log | grep -E '^\||^[a-z].*\(torch' >> "$out"
  echo >> "$out"
}
run "Cost model accuracy (issue 4)" $PY benchmarks/bench_cost_model.py --n 20
run "Pruning and skipping vs FLOP-ideal (issue 3)" $PY benchmarks/bench_prune.py
run "Pruning at 1x128 (issue 3)" $PY benchmarks/bench_prune.py --models minilm --shape 1x128 --runtimes torch
run "Search to targets (issues 4, 7)" $PY benchmarks/bench_search.py --runtimes torch
