#!/usr/bin/env bash
# The GPU check of issue 11, on one machine with an NVIDIA GPU: install vLLM and this project, build the
# built-in `mid` model offline, then, with one load generator (benchmarks/openai_load.py: closed-loop clients
# streaming /v1/completions, greedy, a fixed number of new tokens):
#   1. raw vLLM (its own OpenAI server) on mid-s0: tokens/s and time to first token at 1, 16 and 64 clients;
#   2. `lockstep serve` with LOCKSTEP_ENGINE=vllm on the same model: the same levels;
#   3. `lockstep publish` of mid-s1 while 16 clients stream: failed answers, and answers whose version tag
#      (X-Model-Version, the body's model) is not the version whose weights wrote them.
# Prints one table; writes it as JSON to $OUT/gpu_check.json (with the logs' tails) when OUT is set.
#
#   benchmarks/gpu_check.sh            install, then measure (about 10 minutes; the install is most of it)
#   benchmarks/gpu_check.sh install    only the environment: a venv with vllm==$VLLM_VERSION and this project
#   benchmarks/gpu_check.sh measure    only the measurements, in the environment `install` left
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh
#                                      the plumbing on a CPU: no install (the project's .venv), the built-in
#                                      engine, the tiny model, seconds per level; raw vLLM only when
#                                      GPU_CHECK_RAW_PYTHON names an interpreter with vLLM (its CPU build)
# Exit status: 0 the swap was clean; 1 it was not (failed or mislabelled answers, the publish failed);
# 2 usage; 3 the package index cannot be reached; 4 no GPU; 5 a server did not start; 6 an install failed.
#
# Settings (environment; defaults for the GPU run, the dry run's in brackets):
#   GPU_CHECK_DIR        work folder: venv, models, shared folder, logs     var/gpu-check [var/gpu-check-dry]
#   GPU_CHECK_PYTHON     an interpreter that has vllm and this project already: no install
#   GPU_CHECK_RAW_PYTHON the interpreter of the raw vLLM server             GPU_CHECK_PYTHON's [none]
#   GPU_CHECK_ENGINE     LOCKSTEP_ENGINE of the replica                     vllm [builtin]
#   GPU_CHECK_SIZE       built-in model size                                mid [tiny]
#   GPU_CHECK_CLIENTS    concurrency levels                                 "1 16 64" ["1 4"]
#   GPU_CHECK_LEVEL_S    measured seconds per level (after a warm-up)       10 [3]
#   GPU_CHECK_TOKENS     new tokens per request                             128 [16]
#   GPU_CHECK_SWAP_CLIENTS clients during the publish                       16 [4]
#   GPU_CHECK_WARMUP_S   seconds of load before each level is measured      3 [1]
#   GPU_CHECK_STEADY_S   seconds of steady load measured before the publish 10 [3]
#                        (several answer latencies: closed-loop clients answer in bursts)
#   GPU_CHECK_SETTLE_S   seconds of load after the flip                     5 [2]
#   GPU_CHECK_DTYPE      LOCKSTEP_DTYPE of the replica, --dtype of raw vLLM bfloat16 [auto]
#   GPU_CHECK_MAX_BATCH  max sequences per step, both servers               256 [16]
#   GPU_CHECK_SKIP_RAW=1 no raw vLLM server;  GPU_CHECK_EAGER=1 no CUDA graphs/compile (starts faster)
#   GPU_CHECK_START_TIMEOUT seconds a server may take to start              420 [300]
#   GPU_CHECK_STAGE_TIMEOUT seconds the publish may take to stage           300
#   GPU_CHECK_INSTALL_TIMEOUT seconds the pip install may take              540
#   GPU_CHECK_SYSTEM_PYTHON the Python the venv is made from                the first >= 3.11 of
#                                                                           python3.12, python3.11, python3
#   VLLM_VERSION         the CUDA vLLM to install                           0.34.0 (pyproject.toml's extra)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
MODE=${1:-all}
case "$MODE" in all | install | measure) ;; *)
  echo "usage: $0 [all|install|measure]   (GPU_CHECK_DRY_RUN=1: the CPU plumbing run)" >&2
  exit 2
  ;;
esac

DRY=${GPU_CHECK_DRY_RUN:-0}
VLLM_VERSION=${VLLM_VERSION:-0.34.0}
if [ "$DRY" = 1 ]; then
  WORK=${GPU_CHECK_DIR:-$REPO/var/gpu-check-dry}
  PY=${GPU_CHECK_PYTHON:-$REPO/.venv/bin/python}
  SIZE=${GPU_CHECK_SIZE:-tiny}
  CLIENTS=${GPU_CHECK_CLIENTS:-1 4}
  LEVEL_S=${GPU_CHECK_LEVEL_S:-3}
  WARMUP_S=${GPU_CHECK_WARMUP_S:-1}
  STEADY_S=${GPU_CHECK_STEADY_S:-3}
  SETTLE_S=${GPU_CHECK_SETTLE_S:-2}
  TOKENS=${GPU_CHECK_TOKENS:-16}
  SWAP_CLIENTS=${GPU_CHECK_SWAP_CLIENTS:-4}
  START_TIMEOUT=${GPU_CHECK_START_TIMEOUT:-300}
  ENGINE=${GPU_CHECK_ENGINE:-builtin} DEVICE=cpu
  DTYPE=${GPU_CHECK_DTYPE:-auto} MAX_BATCH=${GPU_CHECK_MAX_BATCH:-16}
  RAW_PY=${GPU_CHECK_RAW_PYTHON:-}
else
  WORK=${GPU_CHECK_DIR:-$REPO/var/gpu-check}
  PY=${GPU_CHECK_PYTHON:-$WORK/venv/bin/python}
  SIZE=${GPU_CHECK_SIZE:-mid}
  CLIENTS=${GPU_CHECK_CLIENTS:-1 16 64}
  LEVEL_S=${GPU_CHECK_LEVEL_S:-10}
  WARMUP_S=${GPU_CHECK_WARMUP_S:-3}
  STEADY_S=${GPU_CHECK_STEADY_S:-10}
  SETTLE_S=${GPU_CHECK_SETTLE_S:-5}
  TOKENS=${GPU_CHECK_TOKENS:-128}
  SWAP_CLIENTS=${GPU_CHECK_SWAP_CLIENTS:-16}
  START_TIMEOUT=${GPU_CHECK_START_TIMEOUT:-420}
  # Both servers alike: bfloat16, the share of the GPU a Lockstep engine takes in swap mode, a batch limit
  # above the highest concurrency (so nothing queues in one and not the other).
  ENGINE=${GPU_CHECK_ENGINE:-vllm} DEVICE=cuda
  DTYPE=${GPU_CHECK_DTYPE:-bfloat16} MAX_BATCH=${GPU_CHECK_MAX_BATCH:-256}
  RAW_PY=${GPU_CHECK_RAW_PYTHON:-$PY}
fi
GPU_SHARE=0.45
# The raw server's dtype: the replica's, spelled for vLLM (auto = bfloat16 where the hardware has it, as here).
RAW_DTYPE=$DTYPE
[ "$RAW_DTYPE" = auto ] && RAW_DTYPE=bfloat16
STAGE_TIMEOUT=${GPU_CHECK_STAGE_TIMEOUT:-300}
INSTALL_TIMEOUT=${GPU_CHECK_INSTALL_TIMEOUT:-540}
MODELS=$WORK/models
LOGS=$WORK/logs
RESULTS=$WORK/results
LOAD=(benchmarks/openai_load.py)

log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { # fail STATUS MESSAGE
  log "FAILED: $2"
  exit "$1"
}

# --- processes: each server in its own process group, all stopped on exit --------------------------------
GROUPS_STARTED=()
start_group() { # start_group NAME COMMAND...: in the background, its own session; sets STARTED_PID
  local name=$1
  shift
  if command -v setsid >/dev/null; then
    setsid "$@" >"$LOGS/$name.log" 2>&1 &
  else
    "$@" >"$LOGS/$name.log" 2>&1 &
  fi
  STARTED_PID=$!
  GROUPS_STARTED+=("$STARTED_PID")
  log "started $name (pid $STARTED_PID), log $LOGS/$name.log"
}
stop_group() { # stop_group PID: SIGTERM to its group, SIGKILL after 30 s; forgotten then (its id may be reused)
  local pid=$1 waited=0 kept=() other
  for other in ${GROUPS_STARTED[@]+"${GROUPS_STARTED[@]}"}; do
    [ "$other" = "$pid" ] || kept+=("$other")
  done
  GROUPS_STARTED=(${kept[@]+"${kept[@]}"})
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge 30 ]; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 1
    waited=$((waited + 1))
  done
  wait "$pid" 2>/dev/null || true
}
on_exit() {
  local status=$?
  local pid
  for pid in ${GROUPS_STARTED[@]+"${GROUPS_STARTED[@]}"}; do
    stop_group "$pid"
  done
  if [ -n "${OUT:-}" ] && [ -d "$LOGS" ]; then
    mkdir -p "$OUT/gpu_check_logs"
    local f
    for f in "$LOGS"/*.log; do
      [ -e "$f" ] && tail -n 400 "$f" >"$OUT/gpu_check_logs/$(basename "$f")"
    done
  fi
  exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

http_ok() { # http_ok URL: the URL answers 200 within 5 s
  "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}
wait_http() { # wait_http URL PID NAME: until URL answers 200, the process dies, or START_TIMEOUT passes
  local url=$1 pid=$2 name=$3 started=$SECONDS
  until http_ok "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$LOGS/$name.log" >&2 || true
      fail 5 "$name exited before $url answered (log: $LOGS/$name.log)"
    fi
    if [ $((SECONDS - started)) -ge "$START_TIMEOUT" ]; then
      tail -n 40 "$LOGS/$name.log" >&2 || true
      fail 5 "$name: $url did not answer within ${START_TIMEOUT}s (GPU_CHECK_START_TIMEOUT)"
    fi
    sleep 2
  done
  log "$name answers $url after $((SECONDS - started))s"
}
free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- install ----------------------------------------------------------------------------------------------
install() {
  if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    log "GPU_CHECK_PYTHON=$GPU_CHECK_PYTHON: using it as it is, nothing installed"
    return 0
  fi
  local system_python=${GPU_CHECK_SYSTEM_PYTHON:-} candidate
  if [ -z "$system_python" ]; then
    for candidate in python3.12 python3.11 python3; do
      if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        system_python=$candidate
        break
      fi
    done
    [ -n "$system_python" ] || fail 6 "no Python >= 3.11 here (the project's minimum): set GPU_CHECK_SYSTEM_PYTHON"
  fi
  command -v "$system_python" >/dev/null || fail 6 "no $system_python on this machine (GPU_CHECK_SYSTEM_PYTHON)"
  log "making the venv with $("$system_python" --version 2>&1) ($system_python)"
  mkdir -p "$WORK"
  if [ ! -x "$WORK/venv/bin/python" ]; then
    log "creating $WORK/venv"
    "$system_python" -m venv "$WORK/venv" 2>/dev/null || {
      rm -rf "$WORK/venv"
      "$system_python" -m pip install --user --quiet virtualenv && "$system_python" -m virtualenv -q "$WORK/venv"
    } || fail 6 "cannot create a virtual environment (no venv module and no virtualenv)"
  fi
  local pip=("$WORK/venv/bin/python" -m pip --disable-pip-version-check)
  log "asking the package index for vllm (pip's own configuration and mirror)"
  local versions
  if ! versions=$(timeout 90 "${pip[@]}" index versions vllm 2>&1); then
    printf '%s\n' "$versions" | tail -n 5 >&2
    fail 3 "the package index cannot be reached from this machine (or has no vllm): vllm==$VLLM_VERSION cannot be installed here. Run on a machine that reaches PyPI (or a mirror: PIP_INDEX_URL), or set GPU_CHECK_PYTHON to an interpreter that has vllm and this project installed."
  fi
  case "$versions" in *"$VLLM_VERSION"*) ;; *)
    fail 3 "the package index has no vllm $VLLM_VERSION: $(printf '%s\n' "$versions" | head -n 2)"
    ;;
  esac
  log "installing vllm==$VLLM_VERSION (it brings its own CUDA torch) and this project, editable"
  local started=$SECONDS
  timeout "$INSTALL_TIMEOUT" "${pip[@]}" install --progress-bar off --quiet "vllm==$VLLM_VERSION" -e "$REPO" \
    >"$WORK/install.log" 2>&1 || {
    tail -n 30 "$WORK/install.log" >&2
    fail 6 "pip install failed or took over ${INSTALL_TIMEOUT}s (log: $WORK/install.log)"
  }
  log "installed in $((SECONDS - started))s"
  "$WORK/venv/bin/python" - <<'EOF' || fail 4 "torch sees no CUDA device (driver too old for this torch's CUDA?)"
import torch, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
raise SystemExit(0 if torch.cuda.is_available() else 1)
EOF
}

# --- measure ----------------------------------------------------------------------------------------------
measure() {
  [ -x "$PY" ] || fail 6 "$PY does not exist: run \`$0 install\` first (or set GPU_CHECK_PYTHON)"
  "$PY" -c 'import lockstep, httpx' 2>/dev/null || fail 6 "$PY cannot import lockstep and httpx"
  if [ "$DRY" != 1 ]; then
    command -v nvidia-smi >/dev/null || fail 4 "no nvidia-smi: this is not a machine with an NVIDIA GPU (GPU_CHECK_DRY_RUN=1 for the CPU plumbing run)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || fail 4 "nvidia-smi sees no GPU"
  fi
  mkdir -p "$MODELS" "$LOGS" "$RESULTS"
  rm -f "$RESULTS"/*.json
  # Nothing of the caller's Lockstep configuration (a shared folder, a token, URLs) reaches the servers.
  local name
  while read -r name; do unset "$name"; done < <(compgen -e | grep -E '^(LOCKSTEP_|INFERENCE_URLS$|SYNC_STATE_FILE$|INITIAL_MODEL)')

  export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  export VLLM_CACHE_ROOT=$WORK/cache/vllm TORCHINDUCTOR_CACHE_DIR=$WORK/cache/inductor TRITON_CACHE_DIR=$WORK/cache/triton
  if [ "$DRY" = 1 ]; then
    export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 # a shared 2-core machine
  fi

  log "building the built-in $SIZE model, seeds 0 and 1 (offline, deterministic)"
  local seed pids=()
  for seed in 0 1; do
    timeout 600 "$PY" -m lockstep --log-level warning tiny-model "$MODELS/$SIZE-s$seed" --size "$SIZE" \
      --seed "$seed" --if-missing >"$LOGS/model-s$seed.log" 2>&1 &
    pids+=("$!")
  done
  for seed in 0 1; do
    wait "${pids[$seed]}" || fail 6 "building $SIZE-s$seed failed: $(tail -n 5 "$LOGS/model-s$seed.log")"
  done

  local eager=() eager_setting=auto
  if [ "${GPU_CHECK_EAGER:-0}" = 1 ] || [ "$DRY" = 1 ]; then
    eager=(--enforce-eager)
    eager_setting=true
  fi
  # shellcheck disable=SC2206 # CLIENTS is a list of numbers
  local levels=(--concurrency $CLIENTS --seconds "$LEVEL_S" --warmup "$WARMUP_S" --tokens "$TOKENS")

  # 1. raw vLLM
  if [ "${GPU_CHECK_SKIP_RAW:-0}" = 1 ] || [ -z "$RAW_PY" ]; then
    log "raw vLLM: skipped (GPU_CHECK_SKIP_RAW=1, or a dry run without GPU_CHECK_RAW_PYTHON)"
  elif ! "$RAW_PY" -c 'import vllm' 2>/dev/null; then
    log "raw vLLM: skipped ($RAW_PY cannot import vllm)"
  else
    local raw_port raw_pid server
    raw_port=$(free_port)
    # `vllm serve` where the distribution is vllm; its CPU build's console script looks up the wrong name,
    # and its server module serves both.
    if "$RAW_PY" -c 'import importlib.metadata as m; m.distribution("vllm")' 2>/dev/null &&
      [ -x "$(dirname "$RAW_PY")/vllm" ]; then
      server=("$(dirname "$RAW_PY")/vllm" serve "$MODELS/$SIZE-s0")
    else
      server=("$RAW_PY" -m vllm.entrypoints.openai.api_server --model "$MODELS/$SIZE-s0")
    fi
    # Dev mode: vLLM's own /pause, /collective_rpc and /resume, for what a raw reload costs (step 1b).
    VLLM_SERVER_DEV_MODE=1 start_group raw-vllm "${server[@]}" --served-model-name raw --dtype "$RAW_DTYPE" \
      --host 127.0.0.1 \
      --port "$raw_port" --gpu-memory-utilization "$GPU_SHARE" --max-num-seqs "$MAX_BATCH" \
      ${eager[@]+"${eager[@]}"}
    raw_pid=$STARTED_PID
    wait_http "http://127.0.0.1:$raw_port/health" "$raw_pid" raw-vllm
    timeout $((START_TIMEOUT + 600)) "$PY" "${LOAD[@]}" levels --url "http://127.0.0.1:$raw_port" --model raw \
      --label "raw vLLM" "${levels[@]}" --json "$RESULTS/raw.json"
    # 1b. raw vLLM changing its weights under the same load: its own pause / reload_weights / resume. Nothing
    # tells a client which weights wrote its answer; the table shows the pause it costs.
    timeout $((STAGE_TIMEOUT + 300)) "$PY" "${LOAD[@]}" swap --url "http://127.0.0.1:$raw_port" --model raw \
      --label "raw vLLM reload" --concurrency "$SWAP_CLIENTS" --tokens "$TOKENS" --warmup "$WARMUP_S" \
      --steady "$STEADY_S" --settle "$SETTLE_S" --timeout "$STAGE_TIMEOUT" --json "$RESULTS/raw_reload.json" -- "$PY" -c '
import sys, httpx
url, path = sys.argv[1:]
steps = [("/pause?mode=wait", None),
         ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}}),
         ("/resume", None)]
for step, body in steps:
    httpx.post(url + step, json=body, timeout=600).raise_for_status()
' "http://127.0.0.1:$raw_port" "$MODELS/$SIZE-s1" || log "raw vLLM reload: not clean (see $RESULTS/raw_reload.json)"
    stop_group "$raw_pid"
  fi

  # 2. lockstep serve on the same model, a shared folder of its own
  local shared=$WORK/shared
  rm -rf "$shared"
  mkdir -p "$shared"
  export LOCKSTEP_ENGINE=$ENGINE LOCKSTEP_DEVICE=$DEVICE LOCKSTEP_DTYPE=$DTYPE LOCKSTEP_BUILTIN_DIR=$MODELS
  export LOCKSTEP_MAX_BATCH_SIZE=$MAX_BATCH LOCKSTEP_MAX_QUEUE=1024 LOCKSTEP_VLLM_GPU_MEMORY_UTILIZATION=$GPU_SHARE
  export LOCKSTEP_VLLM_ENFORCE_EAGER=$eager_setting LOCKSTEP_STAGE_TIMEOUT_S=$STAGE_TIMEOUT
  local port
  port=$(free_port)
  start_group lockstep "$PY" -m lockstep --log-level info serve --host 127.0.0.1 --port "$port" \
    --model "builtin:$SIZE-s0" --shared "$shared"
  local lockstep_pid=$STARTED_PID url="http://127.0.0.1:$port"
  wait_http "$url/ready" "$lockstep_pid" lockstep
  timeout $((START_TIMEOUT + 600)) "$PY" "${LOAD[@]}" levels --url "$url" --model lockstep \
    --label lockstep "${levels[@]}" --json "$RESULTS/lockstep.json"

  # 3. a publish under load
  local swap_status=0
  timeout $((STAGE_TIMEOUT + 300)) "$PY" "${LOAD[@]}" swap --url "$url" --model lockstep \
    --concurrency "$SWAP_CLIENTS" --tokens "$TOKENS" --warmup "$WARMUP_S" --steady "$STEADY_S" --settle "$SETTLE_S" \
    --expect-version 1 --timeout "$STAGE_TIMEOUT" --json "$RESULTS/swap.json" \
    -- "$PY" -m lockstep --log-level warning publish "builtin:$SIZE-s1" --shared "$shared" \
    --timeout "$STAGE_TIMEOUT" || swap_status=$?

  # What the replica says it ran on, and the answers vLLM itself saw sampled by another version's weights.
  "$PY" - "$url" "$RESULTS/replica.json" <<'EOF' || log "could not read the replica's /status and /metrics"
import json, sys, urllib.request
url, path = sys.argv[1:]
status = json.load(urllib.request.urlopen(url + "/status", timeout=10))
lines = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode().splitlines()
mismatches = [float(x.split()[-1]) for x in lines if x.startswith("lockstep_engine_version_mismatches_total")]
json.dump({"engine": status.get("engine"), "serving_version": status.get("serving_version"),
           "vllm_series": sum(1 for x in lines if x.startswith("vllm:")),
           "engine_version_mismatches": mismatches[0] if mismatches else None}, open(path, "w"))
EOF
  stop_group "$lockstep_pid"

  "$PY" - "$RESULTS/meta.json" "$RESULTS/replica.json" "$MODE" "$DRY" "$SIZE" "$ENGINE" <<'EOF'
import json, os, platform, subprocess, sys
path, replica, mode, dry, size, engine = sys.argv[1:]
meta = {"mode": mode, "dry_run": dry == "1", "model": f"builtin:{size}", "LOCKSTEP_ENGINE": engine,
        "replica": json.load(open(replica)) if os.path.exists(replica) else None,
        "python": platform.python_version()}
for name in ("vllm", "torch", "transformers"):
    try:
        meta[name] = __import__(name).__version__
    except Exception as exc:
        meta[name] = f"not importable: {type(exc).__name__}"
try:
    meta["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError):
    meta["gpu"] = None
json.dump(meta, open(path, "w"), indent=2)
EOF
  local title="builtin:$SIZE, $TOKENS new tokens, ${LEVEL_S}s per level, LOCKSTEP_ENGINE=$ENGINE"
  [ "$DRY" = 1 ] && title="DRY RUN on this CPU (not a measurement): $title"
  local out=()
  [ -n "${OUT:-}" ] && out=(--json "$OUT/gpu_check.json")
  printf '\nGPU check: %s\n' "$title"
  "$PY" "${LOAD[@]}" report --raw "$RESULTS/raw.json" --lockstep "$RESULTS/lockstep.json" \
    --swap "$RESULTS/swap.json" --raw-reload "$RESULTS/raw_reload.json" --meta "$RESULTS/meta.json" \
    ${out[@]+"${out[@]}"}
  if [ -n "${OUT:-}" ]; then
    log "results: $OUT/gpu_check.json, logs: $OUT/gpu_check_logs/"
  fi
  if [ "$swap_status" != 0 ]; then
    log "the swap was not clean (status $swap_status): see the table and $RESULTS/swap.json"
  fi
  return "$swap_status"
}

if [ "$MODE" != measure ]; then
  if [ "$DRY" = 1 ]; then
    log "dry run: nothing installed, $PY as it is"
  else
    install
  fi
fi
if [ "$MODE" != install ]; then
  measure
fi
