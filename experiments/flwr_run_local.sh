#!/usr/bin/env bash
# Run fedsim as a Flower App: `flwr run` against a local simulation SuperLink.
#
#   experiments/flwr_run_local.sh                      # pyproject's [tool.flwr.app.config]
#   experiments/flwr_run_local.sh "rounds=5 client.lr=0.05"   # --run-config overrides
#   experiments/flwr_run_local.sh "overwrite=true"   # replace the run already in runs/flwr-run/
#
# We start the SuperLink ourselves, with --disable-runtime-dependency-installation:
# the SuperLink that `flwr run` starts on its own installs the app's dependencies
# into a fresh env with `uv sync`, which resolves torch from the registry (a
# multi-GB CUDA build) instead of using the CPU torch already installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
num_supernodes="${NUM_SUPERNODES:-10}"
port="${FEDSIM_SUPERLINK_PORT:-39093}"
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedsim-local"

[superlink.fedsim-local]
address = "127.0.0.1:$port"
insecure = true
TOML

flower-superlink --insecure --simulation --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$port" >"$FLWR_HOME/superlink.log" 2>&1 &
superlink=$!
trap 'kill $superlink 2>/dev/null; wait $superlink 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
  kill -0 $superlink 2>/dev/null || { cat "$FLWR_HOME/superlink.log"; exit 1; }
  sleep 0.5
done

run_config=("--run-config" "data.num_clients=$num_supernodes ${1:-}")
flwr run . fedsim-local --stream --federation-config "num-supernodes=$num_supernodes" "${run_config[@]}"
