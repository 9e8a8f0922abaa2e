"""Training: run configuration, distribution, optimizer and schedule, the shared loop pieces, run logs, checkpointing
and resume, EMA, the guidance monitor, the memory planner, and `recipes/` (one file per training method). Builds on
`flux`, `lora` and `data`."""
