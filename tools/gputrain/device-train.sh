#!/usr/bin/env bash
# Runs on the lent GPU machine (PyTorch, no .NET), in the repository root: assembles the pack that tools/gputrain/stage cut
# into .gpu/part-*/ (once; later calls reuse it), then trains one model with train_gpu.py and copies its snapshots,
# metrics and log to $OUT.
#
# Usage: bash tools/gputrain/device-train.sh RUN_NAME [--config NAME] [train_gpu.py options...]
#   --config NAME: the config directory stage packed (default: cfg). The forward check uses the pack's check.* and
#   models/openvla-small-tabletop, the checkpoint Program.cs computed them with unless told otherwise (CHECK=DIR).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: device-train.sh RUN_NAME [--config NAME] [train_gpu.py options...]" >&2; exit 2; }
RUN="$1"; shift
CFG=cfg
if [ "${1:-}" = --config ]; then CFG="$2"; shift 2; fi
REPO="$PWD" P="${PACK_DIR:-/root/pack}" CHECK="${CHECK:-$PWD/models/openvla-small-tabletop}"
OUT="${OUT:?set OUT to the output folder}"

if [ ! -f "$P/meta.json" ] || [ ! -f "$P/frames.u8" ]; then
  n=$(ls -d .gpu/part-* 2>/dev/null | wc -l)
  [ "$n" -gt 0 ] || { echo "device-train: no .gpu/part-* here (carry them first, one per call)" >&2; exit 2; }
  mkdir -p "$P"
  s=$(date +%s)
  for i in $(seq 1 "$n"); do cat ".gpu/part-$i"/chunk.*; done | tar -xf - -C "$P"
  for f in frames.u8 aux.f32 ids.i16; do [ -f "$P/$f.xz" ] && xz -d -f -T0 "$P/$f.xz"; done
  echo "device-train: pack assembled from $n part(s) in $(( $(date +%s) - s )) s" >&2
fi
[ -f "$P/$CFG/config.json" ] || { echo "device-train: the pack has no config '$CFG'" >&2; exit 2; }

mkdir -p /root/run
cd "$REPO/tools/gputrain"
status=0
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" train_gpu.py "$P" "$P/$CFG" "$CHECK" "/root/run/$RUN" "$@" 2>&1 | tee "$OUT/$RUN.log" || status=$?
mkdir -p "$OUT/$RUN"
cp "/root/run/$RUN"/model-*.safetensors "/root/run/$RUN"/metrics.jsonl "$OUT/$RUN/" 2>/dev/null || true
cp "$P/$CFG/config.json" "$P/$CFG/preprocessor_config.json" "$OUT/$RUN/"
ls -la "$OUT/$RUN"
exit "$status"
