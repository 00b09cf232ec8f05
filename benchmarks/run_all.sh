#!/usr/bin/env bash
# Run the benchmarks one after another (timings need a quiet machine) and collect the tables in
# benchmarks/RESULTS.md, most important first. THREADS (default 2) sets the thread count.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
T=${THREADS:-2}
out=${OUT:-benchmarks/RESULTS.md}
{
  echo "# Benchmark results"
  echo
  echo "Made by \`benchmarks/run_all.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $T thread(s)."
  echo
} > "$out"
run() {
  echo "## $1" >> "$out"; echo >> "$out"
  echo "\`${*:2}\` — load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out"; echo >> "$out"
  "${@:2}" 2>&1 | tee -a /tmp/bench-all.log | grep -E '^\||^[a-z].*\(torch' >> "$out"
  echo >> "$out"
}
run "Cost model accuracy, MiniLM 8x128, torch (issue 4)" $PY benchmarks/bench_cost_model.py --models minilm --runtimes torch --n 20 --threads $T
run "Search to targets, MiniLM 8x128, torch (issue 4)" $PY benchmarks/bench_search.py --models minilm --runtimes torch --threads $T
run "Pruning and skipping vs FLOP-ideal, MiniLM (issue 3)" $PY benchmarks/bench_prune.py --models minilm --threads $T
run "Search with int8, MiniLM 8x128, onnxruntime (issue 7)" $PY benchmarks/bench_search.py --models minilm --runtimes onnxruntime --targets 2.5 --threads $T
run "Cost model accuracy, sample 4x512 (issue 4)" $PY benchmarks/bench_cost_model.py --models sample --runtimes torch --n 20 --threads $T
run "Search to targets, sample 4x512, torch (issue 4)" $PY benchmarks/bench_search.py --models sample --runtimes torch --threads $T
run "Pruning and skipping vs FLOP-ideal, sample (issue 3)" $PY benchmarks/bench_prune.py --models sample --threads $T
run "Compensation: quality with and without (issues 3, 4)" $PY benchmarks/bench_compensate.py --threads $T
run "Search to targets, sample 4x512, onnxruntime (issue 4)" $PY benchmarks/bench_search.py --models sample --runtimes onnxruntime --threads $T
run "Cost model accuracy, onnxruntime (issue 4)" $PY benchmarks/bench_cost_model.py --runtimes onnxruntime --n 20 --threads $T
run "Sparse attention: the op alone, 2k-16k (issue 6)" $PY benchmarks/bench_sparse_attention.py --part op --threads $T
run "Sparse attention: windows vs uniform, long-context sample 1x1024 (issue 6)" $PY benchmarks/bench_sparse_attention.py --part model --seq 1024 --checkpoint samples/tinyllama-py-1k --threads $T
