#!/usr/bin/env bash
# launch/train.py on a GPU as a user runs it: a random ~1.1B Llama (Llama-3.2-1B's shape: hidden
# 2048, 16 layers, GQA 32/8 heads, MLP 8192, tied embeddings) with SmolLM2's tokenizer, chat
# instruction data, the shipped ds_configs/zero3_bf16_fsam.json (partitioned loading, loss on the
# responses, streamed 16-bit save), AdamW then FSAM then SAM, and a from_pretrained reload of the
# saved model (BENCHMARKS.md, "train.py on a GPU").
#   bash bench/run_train_py_gpu.sh TOKENIZER_DIR DATA_DIR OUT_DIR     (STEPS=30 SEQ=512)
set -uo pipefail
cd "$(dirname "$0")/.."
TOK=${1:?tokenizer dir} DATA=${2:?data dir with train/validation.jsonl} OUT=${3:?out dir}
export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
MODEL=/tmp/llama_1b
python - "$TOK" "$MODEL" <<'PY'
import sys, time, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(sys.argv[1])
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
t = time.time()
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
print(f"random Llama: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params, saved in {time.time() - t:.0f} s")
PY
for opt in ${OPTIMIZERS:-adamw fsam sam}; do
  torchrun --standalone --nproc_per_node 1 launch/train.py --task causal_lm \
    --deepspeed_config ds_configs/zero3_bf16_fsam.json --optimizer $opt --model_name_or_path $MODEL \
    --train_file "$DATA/train.jsonl" --validation_file "$DATA/validation.jsonl" \
    --max_steps "${STEPS:-30}" --max_seq_length "${SEQ:-512}" --max_eval_samples 256 --eval_before \
    --log_every 10 --output_dir /tmp/run_$opt > "$OUT/log_$opt.txt" 2>&1
  grep "^\[train\]\|^\[eval\]\|Error\|error:" "$OUT/log_$opt.txt" | cut -c1-400
  cp /tmp/run_$opt/metrics.json "$OUT/metrics_$opt.json" 2>/dev/null
done
python - <<'PY'
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("/tmp/run_fsam/model")
print("reloaded /tmp/run_fsam/model:", type(m).__name__, next(m.parameters()).dtype,
      f"{sum(p.numel() for p in m.parameters()) / 1e9:.3f}B params, tied {m.config.tie_word_embeddings}")
PY
ls -la /tmp/run_fsam/model
