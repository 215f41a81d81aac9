#!/usr/bin/env bash
# Issue 25's four comparisons, one after the other, for a quiet machine (about 17 minutes on 2 cores):
#   benchmarks/issue25.sh            # everything; each script's full output in bench-out/issue25/*.txt
#   benchmarks/issue25.sh tiny aoti  # only those (tiny, resnet, aoti, peers)
#   QUICK=1 benchmarks/issue25.sh    # one short round each: checks the tooling, not the figures
# Prints the load average around each run and, at the end, every TARGET and ratio line.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench-out/issue25
mkdir -p "$OUT"
declare -A RUNS=(
    [tiny]="benchmarks/tiny.py --ts-setups best,netty1"
    [resnet]="benchmarks/serve.py --models resnet34 --concurrency 1,8 --no-memory --ours-shapes default --duration 6"
    [aoti]="benchmarks/aoti.py --duration 6"
    [peers]="benchmarks/peers.py --duration 4 --warmup 3"
)
QUICK_ARGS=""
[ "${QUICK:-0}" = 1 ] && QUICK_ARGS="--rounds 1 --duration 2 --warmup 2"
ORDER=("${@:-tiny resnet aoti peers}")
for name in ${ORDER[*]}; do
    [ -n "${RUNS[$name]:-}" ] || { echo "issue25.sh: no run named $name (tiny, resnet, aoti, peers)" >&2; exit 2; }
    echo "== $name: ${RUNS[$name]}  ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
    start=$(date +%s)
    # shellcheck disable=SC2086 - the command line is split on purpose
    extra=$QUICK_ARGS
    [ "$name" = aoti ] && extra=${extra/ --warmup 2/}  # aoti.py has no --warmup
    $PY ${RUNS[$name]} $extra --out "$OUT/$name" >"$OUT/$name.txt" 2>&1
    echo "   exit $?, $(( $(date +%s) - start )) s, load after $(cut -d' ' -f1-3 /proc/loadavg); $OUT/$name.txt"
done
echo
for name in ${ORDER[*]}; do
    echo "== $name"
    grep -E "TARGET|x \(best/best\)|^- " "$OUT/$name.txt" | grep -v -i "warn" || true
done
# Each script stops what it started; on a quiet machine nothing of these should be left.
pgrep -af "org.pytorch.serve.ModelServer|raylet|gcs_server|archiver.integrations.kserve|archiver.cli serve" \
    && echo "^ still running: check whether any of it is left from these runs" || echo "no server left running"
