#!/usr/bin/env bash
# Sweeps on the queue: jobs per minute with 1, 2 and 3 workers on the tiny model, and the queue's share of
# each job (the Redis commands around it: read, mark running, acknowledge and record) against the job's
# own time, as the workers report them. Starts its own redis-server on a free loopback port.
# Usage: scripts/bench_queue.sh [JOBS [SIZE [STEPS]]]   (default 60 jobs, 64×64, 2 steps)
# DIFFLOOM_BIN chooses the binary (default target/release/diffloom, built when missing).
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/env.sh"
cd "$DIFFLOOM_ROOT"
jobs=${1:-60} size=${2:-64} steps=${3:-2}
bin=${DIFFLOOM_BIN:-target/release/diffloom}
[[ -x $bin ]] || cargo build --release --locked --quiet --bin diffloom
command -v redis-server >/dev/null || { echo "redis-server is missing: run scripts/setup.sh" >&2; exit 1; }

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --appendonly yes --save "" --dir "$work" >/dev/null &
redis=$!
trap 'kill $redis 2>/dev/null; rm -rf "$work"' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
url=redis://127.0.0.1:$port/bench

echo "$jobs jobs, ${size}x${size}, $steps steps, tiny model, one torch thread per worker, $(nproc) cores"
for n in 1 2 3; do
    redis-cli -p "$port" flushall >/dev/null
    pids=()
    for i in $(seq 1 "$n"); do
        "$bin" worker --queue "$url" --name "w$i" --threads 1 --no-disk-cache -o "$work/out$n" >"$work/w$n-$i.log" 2>&1 &
        pids+=($!)
    done
    # Submitted once the workers have loaded libtorch; the first job of each loads the model.
    sleep 3
    id=$("$bin" sweep graphs/txt2img.ron --set width="$size" --set height="$size" --set steps="$steps" \
        --grid seed=1.."$jobs" --queue "$url" | awk 'NR==1 {sub(":", "", $2); print $2}')
    "$bin" sweep status "$id" --queue "$url" --wait >"$work/status$n.txt"
    kill -INT "${pids[@]}"
    wait "${pids[@]}" 2>/dev/null || true
    rate=$(awk '/^overall:/ {print $2}' "$work/status$n.txt")
    # Jobs after each worker's first (which loads the model): mean job time and queue time.
    cat "$work"/w"$n"-*.log | awk -v n="$n" -v rate="$rate" '
        /: done in / { w = $2; if (seen[w]++) { match($0, /done in [0-9.]+ s/); t = substr($0, RSTART + 8, RLENGTH - 10);
                       match($0, /queue [0-9.]+ ms/); q = substr($0, RSTART + 6, RLENGTH - 9); job += t; queue += q / 1000; k++ } }
        END { printf "%d worker%s: %s jobs/min; per job %.1f ms running, %.2f ms in the queue (%.1f%%)\n",
              n, (n > 1 ? "s" : ""), rate, 1000 * job / k, 1000 * queue / k, 100 * queue / job }'
done
