"""Fine-tune a Hugging Face model for text classification with FSAM through the Hugging Face Trainer
(in the style of transformers' examples/pytorch/text-classification/run_glue.py). The only FSAM
specifics: `FSAMTrainer` instead of `Trainer`, and a DeepSpeed JSON with an "fsam" block.

  python launch/prepare_data.py movie_reviews data/movie_reviews
  MODEL=$(python launch/prepare_data.py --model_dir)
  deepspeed --num_gpus 2 launch/run_hf_finetune.py --deepspeed ds_configs/hf_zero2_fsam.json \
      --model_name_or_path $MODEL --train_file data/movie_reviews/train.jsonl \
      --validation_file data/movie_reviews/validation.jsonl --output_dir outputs/hf_fsam \
      --do_train --do_eval --per_device_train_batch_size 16 --learning_rate 5e-5 \
      --max_steps 100 --logging_steps 10 --save_steps 50 --max_seq_length 64
  torchrun --nproc_per_node 2 launch/run_hf_finetune.py ...   # same arguments

Data: JSONL or CSV with `text` (or `sentence1`,`sentence2`) and `label` columns, read with
`datasets`. Re-running with the same --output_dir resumes from its last complete checkpoint.
"""
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, HfArgumentParser, TrainingArguments, set_seed)
from transformers.trainer_utils import get_last_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fsam_ds.hf import FSAMTrainer, repair_cpu_deepspeed_state  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "local Hugging Face model directory"})


@dataclass
class DataTrainingArguments:
    train_file: str = field(default=None, metadata={"help": "JSONL/CSV training file"})
    validation_file: str = field(default=None, metadata={"help": "JSONL/CSV validation file"})
    max_seq_length: int = field(default=128)
    max_train_samples: int = field(default=None)
    max_eval_samples: int = field(default=None)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    # CPU ranks only (a no-op on GPUs): before from_pretrained, which builds a ZeRO-3 model under
    # zero.Init from the batch sizes TrainingArguments filled in
    repair_cpu_deepspeed_state(training_args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    for path in (data_args.train_file, data_args.validation_file):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{path}: no such file")

    # resume from the last complete checkpoint (FSAMTrainer renames checkpoint-N into place only
    # after every rank has written it, so a job killed mid-save never leaves a torn one here)
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.info(f"Resuming from {last_checkpoint}")
    set_seed(training_args.seed)

    files = {k: v for k, v in (("train", data_args.train_file), ("validation", data_args.validation_file)) if v}
    extension = os.path.splitext(next(iter(files.values())))[1].lstrip(".")
    raw = load_dataset("csv" if extension in ("csv", "tsv") else "json", data_files=files)
    label_list = sorted(set(raw["train" if "train" in raw else "validation"]["label"]))
    label_to_id = {label: i for i, label in enumerate(label_list)}

    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=len(label_list),
                                        id2label=dict(enumerate(label_list)), label2id=label_to_id)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)

    keys = ("sentence1", "sentence2") if "sentence1" in raw[next(iter(files))].column_names else ("text", None)

    def preprocess(rows):
        texts = (rows[keys[0]],) if keys[1] is None else (rows[keys[0]], rows[keys[1]])
        result = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        result["label"] = [label_to_id[label] for label in rows["label"]]
        return result

    with training_args.main_process_first(desc="tokenizing"):
        data = raw.map(preprocess, batched=True, remove_columns=raw[next(iter(files))].column_names)
    train = data.get("train")
    evaluation = data.get("validation")
    if train is not None and data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if evaluation is not None and data_args.max_eval_samples:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))

    def compute_metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=1)
        return {"accuracy": float((predicted == prediction.label_ids).mean())}

    trainer = FSAMTrainer(model=model, args=training_args,
                          train_dataset=train if training_args.do_train else None,
                          eval_dataset=evaluation if training_args.do_eval else None,
                          processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=compute_metrics)
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=last_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
