#!/usr/bin/env bash
# Regenerates the Python stubs of proto/openvla/v1/policy.proto into openvla/v1/ (committed, so a robot only needs
# python3-grpcio and python3-protobuf). Uses Debian's protoc and grpc_python_plugin (packages protobuf-compiler and
# protobuf-compiler-grpc), whose output matches Debian's python3-protobuf/python3-grpcio. Run it after editing the
# proto; the test suite fails while the committed stubs differ from what this script generates.
#   generate_stubs.sh [OUT_DIR]   (default: this folder)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${1:-$here}"
command -v protoc >/dev/null || { echo "generate_stubs.sh: protoc not found (apt-get install protobuf-compiler)" >&2; exit 1; }
plugin="$(command -v grpc_python_plugin || true)"
[ -n "$plugin" ] || { echo "generate_stubs.sh: grpc_python_plugin not found (apt-get install protobuf-compiler-grpc)" >&2; exit 1; }
mkdir -p "$out"
protoc -I "$root/proto" --python_out="$out" --grpc_python_out="$out" --plugin=protoc-gen-grpc_python="$plugin" \
  "$root/proto/openvla/v1/policy.proto"
