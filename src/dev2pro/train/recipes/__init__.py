"""Training recipes: one linear file per method (setup, loop, save), built from the shared components in
`dev2pro.train` (`config`, `distributed`, `data_loading`, `flow_step`, `optim`, `checkpointing`, `run_logs`, `ema`,
`fsdp`, `sharded`);
nothing there owns a training loop or calls back into a recipe.

- `train_lora`: a LoRA on a frozen base (bf16 or fp8), plain flow loss at a fixed guidance input.
- `dedistill`: full fine-tune of a guidance-distilled model with the guidance input fixed (dev -> dev2pro).
- `distill`: guidance distillation (Meng et al. 2023): a student with a guidance embedding regresses a frozen
  teacher's CFG output.
- `train_base`: plain full training with caption dropout (a model meant for CFG, e.g. the toy world's teacher).

Each module exposes its config dataclass and `run(cfg, resume=False, data=None) -> Path` (the final file). `data`
lets a caller (tests, the toy world) hand in an already cached dataset instead of `[data]`.
"""
