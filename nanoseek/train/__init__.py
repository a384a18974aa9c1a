"""Training: pretraining (`nanoseek train`), supervised fine-tuning (`nanoseek sft`), image+text (`nanoseek train-vlm`).

- optim.py: AdamW with DeepSeek's settings and the learning-rate schedules (warmup + cosine or WSD)
- balance.py: auxiliary-loss-free expert balancing (router bias updates) and the sequence-wise balance loss
- trainer.py: the training step (MTP loss, accumulation, clipping, bf16 autocast), evaluation, and the loop
- checkpoint.py: training checkpoints (HF-layout weights + optimizer, schedule, RNG, data position), verified on resume
- metrics.py: FLOPs and MFU, metrics.jsonl / TensorBoard, the end-of-run plot
- pretrain.py, sft.py: the two commands
- vlm.py, vlm_data.py, vlm_eval.py, vlm_teacher.py: `nanoseek train-vlm` and `eval-vlm` (image+text
  training and its data, accuracy and AUC of generated answers, the teacher that `--distill` trains)
"""
