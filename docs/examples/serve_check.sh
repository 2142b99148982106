#!/bin/bash
# Start pneumonia.serve on a checkpoint, POST one image and one non-image, check it still
# answers, stop it:   bash docs/examples/serve_check.sh CKPT IMAGE [PORT]
# (run from the repository root, with .venv installed: make install)
set -u
ckpt=$1 image=$2 port=${3:-8765}
.venv/bin/python -m pneumonia.serve --ckpt "$ckpt" --port "$port" > /dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
curl -s "http://127.0.0.1:$port/health"; echo
# The row without the two base64 pictures (shown as whether they are there).
curl -s -F "file=@$image" "http://127.0.0.1:$port/predict" | .venv/bin/python -c \
  "import json,sys; d=json.load(sys.stdin); print(json.dumps({k: (v if not k.endswith('_png') else v is not None) for k, v in d.items()}))"
curl -s -w " -> HTTP %{http_code}\n" -F "file=@README.md" "http://127.0.0.1:$port/predict"
curl -s -o /dev/null -w "health after the bad upload: HTTP %{http_code}\n" "http://127.0.0.1:$port/health"
