#!/usr/bin/env bash
# The GPU path, run for real and measured in one go, in at most 8 minutes on one H100/H200: the built-in corpus
# tokenized -> pretrain `small` in bf16 (STEPS steps of 64 x 1,024 tokens) -> SFT -> eval -> 3 GRPO steps (64
# prompts x 16 samples) -> `leanseek serve` answering one OpenAI-API request -> benchmarks/decode.py -> with two or
# more GPUs, FSDP pretraining on 2 under torchrun. Then one table: tokens/s, MFU, peak memory, GRPO step time,
# decode tokens/s.
#
#   benchmarks/gpu_check.sh                       # on a GPU machine
#   STEPS=100 benchmarks/gpu_check.sh             # a quicker check
#   DEVICE=cpu STEPS=2 benchmarks/gpu_check.sh    # the same path, tiny, on a CPU: a smoke test of this script
#
# OUT (default runs/gpu-check, emptied first) keeps every step's log (NAME.log) and output; PORT (default 8765) is
# the server's. Each step has a time limit; the script stops at the first failure and names the step and its log.
# Peak memory: torch.cuda.max_memory_allocated of the process (per rank under FSDP); on a CPU, peak resident memory.
#
# Python: PYTHON when set; else .venv/bin/python when it exists; else a python3 whose torch sees a GPU (a GPU
# machine's own PyTorch, used as it is: leanseek runs from this checkout, nothing is installed, so it works without
# a network); else setup.sh makes .venv. The serve step needs fastapi and uvicorn, and is skipped, and said to be,
# where they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=$PWD/.venv/bin/python
elif python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PY=$(command -v python3)
else
  source ./setup.sh
  PY=$PWD/.venv/bin/python
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's leanseek, installed or not
"$PY" -c "import sys, torch; print(f'[gpu_check] python {sys.version.split()[0]}, torch {torch.__version__}')"
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu-check}
PORT=${PORT:-8765}
if [ "${DEVICE%%:*}" = cpu ]; then  # tiny shapes: the same commands, in a minute or two on a laptop
  STEPS=${STEPS:-4}; MODEL=tiny; VOCAB=4096; SOURCE=builtin:python-topics; BATCH=4; SEQ=128; SFT_BATCH=4
  SFT_SEQ=128; DTYPE=float32; PROMPTS=2; GROUP=4; NEW=16; PROBLEMS=8; K=2; DECODE="--batches 1,4 --new-tokens 16"
  GPUS=0
else
  STEPS=${STEPS:-300}; MODEL=small; VOCAB=32768; SOURCE=builtin; BATCH=64; SEQ=1024; SFT_BATCH=64; SFT_SEQ=512
  DTYPE=bfloat16; PROMPTS=64; GROUP=16; NEW=64; PROBLEMS=200; K=4; DECODE="--batches 1,16,64 --new-tokens 64"
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [ "$GPUS" -ge 1 ] || { echo "gpu_check: no CUDA GPU visible to torch (DEVICE=cpu runs the CPU smoke test)"; exit 1; }
fi
SFT_STEPS=$(( STEPS / 4 > 2 ? STEPS / 4 : 2 ))
FSDP_STEPS=$(( STEPS / 6 > 2 ? STEPS / 6 : 2 ))
if [ -e "$OUT" ] && [ ! -f "$OUT/peak_memory.py" ]; then
  echo "gpu_check: $OUT exists and is not an earlier check's folder; move it away or set OUT"; exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT/memory"
OUT=$(cd "$OUT" && pwd)
export DEVICE OUT HF_HUB_OFFLINE=1  # nothing here needs the network

# Runs `leanseek ARGS...` in this process (under torchrun: in each rank), then records the process's peak memory.
cat > "$OUT/peak_memory.py" <<'EOF'
import json, os, resource, sys
import torch
from leanseek.cli import main
name, argv = sys.argv[1], sys.argv[2:]
main(argv)
device, rank = os.environ["DEVICE"], int(os.environ.get("RANK", "0"))
if device.startswith("cuda"):
    index = int(device.split(":")[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0"))
    peak, what = torch.cuda.max_memory_allocated(index), "torch.cuda.max_memory_allocated"
else:
    peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident memory"
with open(os.path.join(os.environ["OUT"], "memory", f"{name}-rank{rank}.json"), "w") as f:
    json.dump({"bytes": peak, "what": what}, f)
EOF

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "[gpu_check] $name: $*"
  local t0=$SECONDS
  if ! timeout --kill-after=30 "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    tail -n 30 "$OUT/$name.log"
    echo "[gpu_check] $name FAILED (or ran past ${limit}s); its output: $OUT/$name.log"
    exit 1
  fi
  echo "[gpu_check] $name: $((SECONDS - t0)) s"
  echo "$((SECONDS - t0))" >"$OUT/$name.seconds"
}

server=
stop_server() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill "$server" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$server" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$server" 2>/dev/null || true
  fi
  server=
}
trap stop_server EXIT

# the model at the preset's vocabulary even where the corpus's tokenizer falls short of it (the dry run does too)
train=(--preset "$MODEL" --set "vocab_size=$VOCAB" --batch-size "$BATCH" --seq-len "$SEQ" --dtype "$DTYPE"
       --eval-tokens $((4 * SEQ)))
step data 300 "$PY" -m leanseek data --source "$SOURCE" --vocab-size "$VOCAB" --tokenizer-sample-mb 20 \
  --max-mb-per-source 20 --out "$OUT/data"
step pretrain 330 "$PY" "$OUT/peak_memory.py" pretrain pretrain --data "$OUT/data" --out "$OUT/pretrain" \
  "${train[@]}" --device "$DEVICE" --steps "$STEPS" --eval-every "$STEPS" --save-every "$STEPS"
step sft 180 "$PY" -m leanseek sft --init "$OUT/pretrain" --data builtin --out "$OUT/sft" --steps "$SFT_STEPS" \
  --batch-size "$SFT_BATCH" --seq-len "$SFT_SEQ" --dtype "$DTYPE" --eval-every "$SFT_STEPS" \
  --save-every "$SFT_STEPS" --eval-tokens $((4 * SFT_SEQ)) --device "$DEVICE"
step eval 180 "$PY" -m leanseek eval "$OUT/sft" --task sums --problems "$PROBLEMS" --k "$K" --show 0 \
  --json "$OUT/eval.json" --device "$DEVICE"
step grpo 300 "$PY" "$OUT/peak_memory.py" grpo rl --init "$OUT/sft" --out "$OUT/rl" --task sums --steps 3 \
  --prompts "$PROMPTS" --group "$GROUP" --max-new-tokens "$NEW" --eval-every 3 --eval-problems "$PROBLEMS" \
  --save-every 3 --keep-zero-std --device "$DEVICE"  # kept: a briefly trained model's rewards may be all equal

serves=$("$PY" -c "import fastapi, uvicorn" 2>/dev/null && echo 1 || echo 0)
if [ "$serves" = 1 ]; then
echo "[gpu_check] serve: leanseek serve $OUT/rl --port $PORT"
"$PY" -m leanseek serve "$OUT/rl" --port "$PORT" --name check --device "$DEVICE" >"$OUT/serve.log" 2>&1 &
server=$!
step request 180 env NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost "$PY" - "$PORT" "$OUT" <<'EOF'
import json, sys, time, urllib.request
port, out = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}/v1"  # the OpenAI API as any client sends it (the standard library: no openai package)
deadline = time.time() + 150
while True:  # the server loads the model before it listens
    try:
        urllib.request.urlopen(f"{base}/models", timeout=5).read()
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(1)
body = {"model": "check", "messages": [{"role": "user", "content": "12+34+56"}], "max_tokens": 48, "temperature": 0}
request = urllib.request.Request(f"{base}/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
t0 = time.perf_counter()
reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
seconds = time.perf_counter() - t0
print(json.dumps(reply, indent=2))
assert reply["choices"][0]["message"]["content"] is not None and reply["usage"]["completion_tokens"] > 0, reply
json.dump({"seconds": seconds, "completion_tokens": reply["usage"]["completion_tokens"]},
          open(f"{out}/request.json", "w"))
EOF
stop_server
else
  echo "[gpu_check] serve: skipped (fastapi and uvicorn are not installed for $PY)"
fi

step decode 300 "$PY" benchmarks/decode.py --model "$OUT/rl/latest" --device "$DEVICE" --no-compile $DECODE

if [ "${DEVICE%%:*}" = cpu ] || [ "$GPUS" -ge 2 ]; then  # FSDP over 2 ranks (gloo processes on a CPU)
  fsdp_device=$DEVICE
  [ "${DEVICE%%:*}" = cpu ] || fsdp_device=cuda  # cuda:LOCAL_RANK in each rank
  step fsdp 300 env DEVICE="$fsdp_device" "$PY" -m torch.distributed.run --nproc_per_node=2 "$OUT/peak_memory.py" \
    fsdp pretrain --fsdp --data "$OUT/data" --out "$OUT/pretrain-fsdp" "${train[@]}" --device "$fsdp_device" \
    --steps "$FSDP_STEPS" --eval-every "$FSDP_STEPS" --save-every "$FSDP_STEPS"
fi

"$PY" - "$OUT" "$STEPS" <<'EOF'
import json, re, statistics, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), int(sys.argv[2])

def lines(run):
    return [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines() if line.strip()]

def memory(name):
    files = sorted((out / "memory").glob(f"{name}-rank*.json"))
    return " / ".join(f"{json.loads(f.read_text())['bytes'] / 2**30:.2f}" for f in files) + " GiB" if files else "-"

def seconds(name):
    f = out / f"{name}.seconds"
    return f"{int(f.read_text())} s" if f.is_file() else "-"

def training(run):  # the median over the second half of the steps: past start-up and compilation
    m = lines(run)[len(lines(run)) // 2:]
    return (f"{statistics.median(x['tokens_per_s'] for x in m):,.0f}", f"{statistics.median(x['mfu'] for x in m):.1%}")

rows = [["pretrain", *training("pretrain"), memory("pretrain"), seconds("pretrain"), f"{steps} steps"],
        ["SFT", *training("sft"), "-", seconds("sft"), "loss on the assistant's tokens"]]
grpo = [x for x in lines("rl") if "reward" in x]
rows.append(["GRPO", "-", "-", memory("grpo"), seconds("grpo"),
             "step " + ", ".join(f"{x['seconds']:.1f}" for x in grpo) + " s (sampling "
             + ", ".join(f"{x['sample_seconds']:.1f}" for x in grpo) + " s)"])
ev = json.loads((out / "eval.json").read_text())
rows.append(["eval", "-", "-", "-", seconds("eval"), f"pass@1 {ev['metrics']['all']['pass@1']:.1%} on "
                                                     f"{ev['metrics']['all']['n']} problems"])
if (out / "request.json").is_file():
    req = json.loads((out / "request.json").read_text())
    rows.append(["serve", "-", "-", "-", seconds("request"), f"one request: {req['completion_tokens']} tokens in "
                                                             f"{req['seconds']:.2f} s"])
else:
    rows.append(["serve", "-", "-", "-", "-", "skipped: fastapi/uvicorn not installed"])
decode = re.findall(r"^\s*(\d+)\s+\S+\s+([\d,]+)\s", (out / "decode.log").read_text(), re.M)
rows.append(["decode (eager engine)", "-", "-", "-", seconds("decode"),
             ", ".join(f"batch {b}: {t} tok/s" for b, t in decode)])
if (out / "pretrain-fsdp" / "metrics.jsonl").is_file():
    rows.append(["pretrain, FSDP on 2", *training("pretrain-fsdp"), memory("fsdp"), seconds("fsdp"),
                 "memory per rank"])
header = ["step", "tokens/s", "MFU", "peak memory", "wall", ""]
widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
for row in [header, ["-" * w for w in widths], *rows]:
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
EOF
