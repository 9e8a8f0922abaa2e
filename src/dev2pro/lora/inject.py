"""LoRA on the Flux transformer: injection through peft, the canonical in-memory form, merging into base weights.

What: `add_lora` wraps the chosen `nn.Linear`s of a diffusers `FluxTransformer2DModel` with peft LoRA layers (trainable,
fp32) and freezes everything else; `lora_state_dict` reads the adapter back as `LoraWeights`, the one in-memory form
every file format converts to and from (`dev2pro.lora.formats`); `merge_lora_into_model` / `unmerge_lora_from_model`
bake a LoRA into the base weights (`W += strength * alpha / r * B @ A`); `apply_lora` attaches a LoRA unmerged, so its
strength can change without touching the base.

Canonical form: one `LoraLayer(down=A (r, in), up=B (out, r), alpha)` per *diffusers module path*
(`transformer_blocks.0.attn.to_q`), fp32. Fused BFL layers (qkv, single-block linear1) are split into their diffusers
parts at the file boundary, never here.

Reference: peft `LoraConfig` / `inject_adapter_in_model` (peft.tuners.lora); delta formula as in kohya sd-scripts
`networks/lora_flux.py` and diffusers' loaders.

Pitfalls:
- peft moves a new adapter to the base layer's dtype (`_move_adapter_to_device_of_base_layer`): on a bf16 base the
  LoRA would be bf16 and on an fp8 base fp8. We cast the adapter back to fp32 and re-initialise it there (seeded), so
  the starting point does not depend on the base dtype.
- Merging into an fp8 base dequantizes, adds and re-quantizes with the layer's own scaling: lossy, so unmerging after
  merging does not give back the original fp8 bytes (nor bf16 bytes). For strength changes use `apply_lora`.
- Wrappers add name prefixes (`module.` from DDP, `_orig_mod.` from torch.compile, `base_model.model.` from
  PeftModel); module paths are compared with those removed.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dev2pro.errors import UserError

# Target presets: regexes, full-matched against module paths of `nn.Linear`s in a FluxTransformer2DModel.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # Attention projections: q/k/v and output of both streams in double blocks, q/k/v in single blocks.
    "attention": (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)",
        r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)",
    ),
    # Every Linear inside double and single blocks, as kohya sd-scripts trains Flux: attention, MLPs (ff, ff_context,
    # proj_mlp, proj_out) and the modulation linears (norm1.linear, norm1_context.linear, norm.linear).
    "all-linear": (
        r"transformer_blocks\.\d+\..+",
        r"single_transformer_blocks\.\d+\..+",
    ),
}

_WRAPPER_PREFIXES = re.compile(r"(^|\.)(module|_orig_mod|base_model\.model)\.")


def clean_module_path(name: str) -> str:
    """Module path without wrapper prefixes (DDP `module.`, compile `_orig_mod.`, PeftModel `base_model.model.`)."""
    prev = None
    while prev != name:
        prev, name = name, _WRAPPER_PREFIXES.sub(r"\1", name)
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Canonical in-memory form


@dataclass
class LoraLayer:
    """One LoRA: `delta W = alpha / rank * up @ down`. down (r, in), up (out, r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def delta(self, strength: float = 1.0, device=None) -> torch.Tensor:
        """`strength * alpha / r * up @ down` in fp32, shape (out, in)."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return (up @ down) * (strength * self.scale)


@dataclass
class LoraWeights:
    """A LoRA for a Flux transformer: `layers[diffusers module path] -> LoraLayer`, plus file metadata.

    `passthrough` keeps keys we do not interpret (e.g. kohya text-encoder `lora_te1_*` entries) so a conversion can
    carry them along; `source_format` says where the weights came from ("kohya", "diffusers", ...).
    """

    layers: dict[str, LoraLayer] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "memory"
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def ranks(self) -> dict[str, int]:
        return {k: v.rank for k, v in self.layers.items()}

    def alphas(self) -> dict[str, float]:
        return {k: float(v.alpha) for k, v in self.layers.items()}

    def num_params(self) -> int:
        return sum(v.down.numel() + v.up.numel() for v in self.layers.values())

    def validate(self, what: str = "LoRA") -> None:
        """Shapes agree inside each layer (down (r, in), up (out, r)); raise UserError otherwise."""
        for key, layer in self.layers.items():
            if layer.down.ndim != 2 or layer.up.ndim != 2 or layer.up.shape[1] != layer.down.shape[0]:
                raise UserError(
                    f"{what}: layer '{key}' has down {tuple(layer.down.shape)} and up {tuple(layer.up.shape)}; "
                    "expected down (rank, in) and up (out, rank)"
                )


# ---------------------------------------------------------------------------------------------------------------------
# Targets and injection


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Clean module path -> base `nn.Linear` (fp8 linears included; peft wrappers resolved to their base layer)."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    out: dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PeftLoraLayer):
            base = mod.get_base_layer()
            if isinstance(base, nn.Linear):
                out[clean_module_path(name)] = base
        elif isinstance(mod, nn.Linear) and not _inside_lora_wrapper(name):
            out[clean_module_path(name)] = mod
    return out


def _inside_lora_wrapper(name: str) -> bool:
    # peft puts the wrapped Linear at `<path>.base_layer` and the adapters at `<path>.lora_A.<adapter>`.
    return ".base_layer" in name or ".lora_A." in name or ".lora_B." in name


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module paths of the Linears selected by `targets`: a preset name (`attention`, `all-linear`) or a list of
    regexes (each full-matched against module paths; presets may appear in the list too). Each entry must select at
    least one Linear."""
    entries = [targets] if isinstance(targets, str) else list(targets)
    if not entries:
        raise UserError(f"LoRA targets are empty: use a preset ({', '.join(TARGET_PRESETS)}) or module-name regexes")
    paths = list(linear_modules(model))
    chosen: set[str] = set()
    for entry in entries:
        patterns = TARGET_PRESETS.get(entry)
        if patterns is None:
            try:
                patterns = (re.compile(entry).pattern,)
            except re.error as e:
                raise UserError(f"LoRA target '{entry}' is not a preset ({', '.join(TARGET_PRESETS)}) "
                                f"nor a valid regex: {e}") from None
        hits = [p for p in paths if any(re.fullmatch(pat, p) for pat in patterns)]
        if not hits:
            raise UserError(f"LoRA target '{entry}' matches no Linear in the model (presets: "
                            f"{', '.join(TARGET_PRESETS)}; example module path: {paths[0] if paths else 'none'})")
        chosen.update(hits)
    return [p for p in paths if p in chosen]  # model order


@contextlib.contextmanager
def _seeded(seed: int | None):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _lora_wrappers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {clean_module_path(n): m for n, m in model.named_modules()
            if isinstance(m, PeftLoraLayer) and adapter_name in m.lora_A}


def _inject(model: nn.Module, paths: list[str], rank: dict[str, int], alpha: dict[str, float], dropout: float,
            adapter_name: str) -> dict[str, nn.Module]:
    from peft import LoraConfig, inject_adapter_in_model

    r0 = Counter(rank.values()).most_common(1)[0][0]
    a0 = Counter(alpha.values()).most_common(1)[0][0]
    # Patterns are regexes inside peft (`(.*\.)?(pattern)$`): escape the exact paths.
    cfg = LoraConfig(
        r=r0, lora_alpha=a0, lora_dropout=dropout, target_modules=list(paths), init_lora_weights=True,
        rank_pattern={re.escape(p): r for p, r in rank.items() if r != r0},
        alpha_pattern={re.escape(p): a for p, a in alpha.items() if a != a0},
    )
    if _lora_wrappers(model, adapter_name):
        raise UserError(f"the model already has a LoRA adapter named '{adapter_name}'")
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    before = {id(p): p.requires_grad for p in model.parameters()}
    active = {id(m): list(m.active_adapters) for m in model.modules() if isinstance(m, PeftLoraLayer)}
    with warnings.catch_warnings():  # "multiple adapters" is intended (training LoRA + sampling LoRAs)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    wrappers = _lora_wrappers(model, adapter_name)
    missing = [p for p in paths if p not in wrappers]
    if missing:  # a name peft resolved differently (prefixes): fail loudly rather than train a partial LoRA
        raise RuntimeError(f"peft did not wrap {len(missing)} target modules, e.g. {missing[:3]}")
    for m in model.modules():  # peft activates only the newest adapter, model-wide: keep the others active
        if isinstance(m, PeftLoraLayer):
            names = active.get(id(m), []) + ([adapter_name] if adapter_name in m.lora_A else [])
            m.set_adapter(names)
    for p, m in wrappers.items():
        a, b = m.lora_A[adapter_name], m.lora_B[adapter_name]
        a.to(torch.float32)
        b.to(torch.float32)
        if a.weight.shape[0] != rank[p]:
            raise RuntimeError(f"peft gave {p} rank {a.weight.shape[0]}, expected {rank[p]}")
    for prm in model.parameters():  # peft's set_adapter makes every active adapter trainable: restore old flags
        prm.requires_grad_(before.get(id(prm), False))
    return wrappers


def rank_alpha_plan(paths: Sequence[str], rank: int, alpha: float, rules: Sequence = ()
                    ) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module (rank, alpha): the first rule (`.pattern` full-matching the module path, `.rank`, `.alpha` or None =
    the rule's rank) that matches a path decides it, else `rank`/`alpha`. A rule matching none of `paths` is an
    error (a typo would otherwise train the default shape silently)."""
    ranks, alphas = dict.fromkeys(paths, int(rank)), dict.fromkeys(paths, float(alpha))
    taken: set[str] = set()
    for i, rule in enumerate(rules):
        hits = [p for p in paths if re.fullmatch(rule.pattern, p)]
        if not hits:
            raise UserError(f"lora.rules[{i}].pattern = {rule.pattern!r} matches none of the {len(paths)} targeted "
                            f"modules (e.g. {paths[0] if paths else 'none'}); widen lora.targets or fix the pattern")
        for p in hits:
            if p not in taken:
                taken.add(p)
                ranks[p] = int(rule.rank)
                alphas[p] = float(rule.alpha if rule.alpha is not None else rule.rank)
    return ranks, alphas


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str | Sequence[str], dropout: float = 0.0,
             adapter_name: str = "default", seed: int | None = None, rules: Sequence = ()) -> list[str]:
    """Inject trainable LoRA layers (fp32) into `model` and freeze everything else. Returns the wrapped module paths.

    `targets`: a preset from `TARGET_PRESETS` or a list of module-path regexes; `rules`: per-pattern rank/alpha
    (`rank_alpha_plan`, given to peft as `rank_pattern`/`alpha_pattern`). `seed` makes the initialisation of A
    (kaiming-uniform, as peft) independent of the global RNG; B starts at zero so the model output is unchanged.
    Works on bf16/fp32 bases and on fp8 bases (`dev2pro.flux.fp8.Fp8Linear`, an `nn.Linear` subclass).
    """
    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise UserError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
    paths = resolve_targets(model, targets)
    model.requires_grad_(False)
    wrappers = _inject(model, paths, *rank_alpha_plan(paths, rank, alpha, rules), dropout, adapter_name)
    with _seeded(seed):
        for p in paths:  # fp32 init, independent of the base dtype (see module docstring)
            wrappers[p].reset_lora_parameters(adapter_name, True)
    for p in paths:
        for t in (wrappers[p].lora_A[adapter_name], wrappers[p].lora_B[adapter_name]):
            t.weight.requires_grad_(True)
    return paths


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The trainable LoRA parameters of `adapter_name` (A then B per module, model order)."""
    params = []
    for m in _lora_wrappers(model, adapter_name).values():
        params += [m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight]
    return params


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> LoraWeights:
    """The adapter `adapter_name` as canonical `LoraWeights` (fp32 copies, CPU)."""
    layers = {}
    for path, m in _lora_wrappers(model, adapter_name).items():
        layers[path] = LoraLayer(
            down=m.lora_A[adapter_name].weight.detach().to("cpu", torch.float32).clone(),
            up=m.lora_B[adapter_name].weight.detach().to("cpu", torch.float32).clone(),
            alpha=float(m.lora_alpha[adapter_name]),
        )
    if not layers:
        raise ValueError(f"the model has no LoRA adapter named '{adapter_name}'")
    return LoraWeights(layers=layers)


def load_lora_state_dict(model: nn.Module, lora: LoraWeights, adapter_name: str = "default") -> None:
    """Copy `lora` into the existing adapter `adapter_name` (same modules and ranks), e.g. to resume training."""
    wrappers = _lora_wrappers(model, adapter_name)
    if set(wrappers) != set(lora.layers):
        extra = sorted(set(lora.layers) - set(wrappers))[:3]
        absent = sorted(set(wrappers) - set(lora.layers))[:3]
        raise UserError(f"LoRA modules do not match adapter '{adapter_name}': unexpected {extra}, missing {absent}")
    with torch.no_grad():
        for p, m in wrappers.items():
            a, b, layer = m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight, lora.layers[p]
            if a.shape != layer.down.shape or b.shape != layer.up.shape:
                raise UserError(f"LoRA layer '{p}': shapes {tuple(layer.down.shape)}/{tuple(layer.up.shape)} do not "
                                f"match the adapter's {tuple(a.shape)}/{tuple(b.shape)}")
            a.copy_(layer.down)
            b.copy_(layer.up)
            m.lora_alpha[adapter_name] = layer.alpha
            m.scaling[adapter_name] = layer.scale


# ---------------------------------------------------------------------------------------------------------------------
# Checks shared by merge and apply


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get"):
        h = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
        return (f"{type(model).__name__}(hidden {h}, {cfg.get('num_layers')} double + "
                f"{cfg.get('num_single_layers')} single blocks)")
    return type(model).__name__


def check_lora_fits(model: nn.Module, lora: LoraWeights, what: str = "LoRA") -> dict[str, nn.Linear]:
    """Every LoRA layer names a Linear of `model` with matching shapes; returns path -> base Linear.

    Raises UserError naming a few unknown keys, or the first key whose shapes do not fit (with both shapes)."""
    lora.validate(what)
    linears = linear_modules(model)
    unknown = [k for k in lora.layers if k not in linears]
    if unknown:
        raise UserError(
            f"{what}: {len(unknown)} of {len(lora.layers)} layers match no Linear in the model, e.g. "
            f"{', '.join(unknown[:4])} ({_model_name(model)}; is this a LoRA for another architecture?)")
    for key, layer in lora.layers.items():
        lin = linears[key]
        if (layer.out_features, layer.in_features) != (lin.out_features, lin.in_features):
            raise UserError(
                f"{what}: layer '{key}' has shape (out {layer.out_features}, in {layer.in_features}) but the model's "
                f"Linear is (out {lin.out_features}, in {lin.in_features}) in {_model_name(model)}; "
                "the LoRA was made for a different model size")
    return {k: linears[k] for k in lora.layers}


# ---------------------------------------------------------------------------------------------------------------------
# Merging into base weights (bf16/fp32 and fp8 Linears)


def _fp8_linear_class():
    try:
        from dev2pro.flux.fp8 import Fp8Linear
    except ImportError:  # fp8 support not installed in this tree
        return None
    return Fp8Linear


def linear_weight_fp32(lin: nn.Linear) -> torch.Tensor:
    """The effective (dequantized) weight of a Linear, fp32."""
    fp8 = _fp8_linear_class()
    if fp8 is not None and isinstance(lin, fp8):
        return lin.dequantized_weight().to(torch.float32)
    return lin.weight.detach().to(torch.float32)


def set_linear_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    """Store fp32 weight `w` in `lin`, in the layer's own storage dtype (fp8 layers re-quantize with their scaling)."""
    fp8 = _fp8_linear_class()
    with torch.no_grad():
        if fp8 is not None and isinstance(lin, fp8):
            from dev2pro.flux.fp8 import quantize

            w8, scale = quantize(w, lin.scaling)  # re-quantize with the layer's own scaling (none/tensor/channel)
            lin.weight.data.copy_(w8.to(lin.weight.device))
            if scale is not None:
                lin.scale_weight.copy_(scale.to(lin.scale_weight.device))
        else:
            lin.weight.copy_(w.to(lin.weight.dtype))


def _add_delta(linears: dict[str, nn.Linear], lora: LoraWeights, strength: float) -> None:
    with torch.no_grad():
        for key, layer in lora.layers.items():
            lin = linears[key]
            w = linear_weight_fp32(lin)
            set_linear_weight(lin, w + layer.delta(strength, device=w.device))


def merge_lora_into_model(model: nn.Module, lora: LoraWeights, strength: float = 1.0, what: str = "LoRA") -> None:
    """`W += strength * alpha / r * B @ A` for every LoRA layer (computed in fp32, stored in the base dtype).

    Works on peft-wrapped models too (the base layer is updated; trainable adapters are left alone). `what` names
    the LoRA (e.g. its file) in error messages."""
    _add_delta(check_lora_fits(model, lora, what), lora, strength)


def unmerge_lora_from_model(model: nn.Module, lora: LoraWeights, strength: float = 1.0, what: str = "LoRA") -> None:
    """Inverse of `merge_lora_into_model` (exact only for fp32 bases; bf16/fp8 round each step)."""
    _add_delta(check_lora_fits(model, lora, what), lora, -strength)


# ---------------------------------------------------------------------------------------------------------------------
# Unmerged application (sampling with LoRAs at a strength)


def apply_lora(model: nn.Module, lora: LoraWeights, strength: float = 1.0, adapter_name: str = "lora",
               what: str = "LoRA") -> None:
    """Attach `lora` as a frozen peft adapter (per-layer ranks and alphas kept) at `strength`; base weights untouched.

    Several LoRAs can be applied under different adapter names; their outputs add. Change the strength later with
    `set_lora_strength`, remove with `remove_lora`. `what` names the LoRA (e.g. its file) in error messages."""
    check_lora_fits(model, lora, what)
    paths = list(lora.layers)
    wrappers = _inject(model, paths, lora.ranks(), lora.alphas(), 0.0, adapter_name)
    with torch.no_grad():
        for p, m in wrappers.items():
            layer = lora.layers[p]
            m.lora_A[adapter_name].weight.copy_(layer.down)
            m.lora_B[adapter_name].weight.copy_(layer.up)
            m.lora_A[adapter_name].weight.requires_grad_(False)
            m.lora_B[adapter_name].weight.requires_grad_(False)
    set_lora_strength(model, strength, adapter_name)


apply_lora_unmerged = apply_lora  # the name used in the design notes


def set_lora_strength(model: nn.Module, strength: float, adapter_name: str = "lora") -> None:
    """Scale adapter `adapter_name` to `strength * alpha / r` in every layer."""
    wrappers = _lora_wrappers(model, adapter_name)
    if not wrappers:
        raise ValueError(f"the model has no LoRA adapter named '{adapter_name}'")
    for m in wrappers.values():
        m.scaling[adapter_name] = strength * float(m.lora_alpha[adapter_name]) / m.r[adapter_name]


def remove_lora(model: nn.Module, adapter_name: str = "lora") -> None:
    """Delete adapter `adapter_name` from every wrapped layer (the wrappers stay; other adapters keep working)."""
    for m in _lora_wrappers(model, adapter_name).values():
        m.delete_adapter(adapter_name)


def adapter_names(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    names: list[str] = []
    for m in model.modules():
        if isinstance(m, PeftLoraLayer):
            names += [a for a in m.lora_A if a not in names]
    return names


def iter_lora_layers(lora: LoraWeights, keys: Iterable[str] | None = None):
    for k in keys or lora.layers:
        yield k, lora.layers[k]
