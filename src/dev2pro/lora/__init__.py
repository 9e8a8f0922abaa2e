"""LoRA adapters: injection into a Flux transformer with peft (`inject`), file formats kohya/diffusers/ComfyUI/XLabs
(`files`), and operations on files and models (`ops`: merge, extract, resize). Builds on `dev2pro.flux` only."""
