"""BFL / ldm autoencoder keys <-> diffusers `AutoencoderKL` keys, as a declarative table with its special cases.

Reference: diffusers' `convert_ldm_vae_checkpoint` (the oracle in tests). Pitfalls: the ldm attention q/k/v/proj_out
are 1x1 convs (C, C, 1, 1) where diffusers has Linear (C, C); the decoder's `up.N` runs in reverse order of
diffusers' `up_blocks.N`.
"""

from __future__ import annotations

import re

import torch

from dev2pro.errors import CheckpointError

# Module prefixes; `{i}`, `{j}` are copied, `{up}` is the decoder level, reversed between the two layouts
# (ldm `decoder.up.0` is the highest resolution, diffusers `decoder.up_blocks.0` the lowest).
AE_PREFIXES: list[tuple[str, str]] = [
    ("encoder.conv_in", "encoder.conv_in"),
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.attn_1", "encoder.mid_block.attentions.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("encoder.norm_out", "encoder.conv_norm_out"),
    ("encoder.conv_out", "encoder.conv_out"),
    ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.attn_1", "decoder.mid_block.attentions.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
    ("decoder.up.{up}.block.{j}", "decoder.up_blocks.{up}.resnets.{j}"),
    ("decoder.up.{up}.upsample.conv", "decoder.up_blocks.{up}.upsamplers.0.conv"),
    ("decoder.norm_out", "decoder.conv_norm_out"),
    ("decoder.conv_out", "decoder.conv_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
]
# Leaf module renames inside resnets and the mid attention (norm1/conv1/norm2/conv2 keep their names).
AE_LEAVES: list[tuple[str, str]] = [
    ("nin_shortcut", "conv_shortcut"),
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
]
# Special case: these diffusers attention leaves are Linear; in ldm files they are 1x1 convs.
AE_CONV1X1_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
# Prefixes that single-file checkpoints put in front of the VAE keys (SD-style and ComfyUI full checkpoints).
AE_FILE_PREFIXES = ("first_stage_model.", "vae.")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("i", "j", "up"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(f"^{pattern}\\.(?P<rest>.+)$")


_AE_FWD = [(_template_regex(src), dst) for src, dst in AE_PREFIXES]
_AE_BWD = [(_template_regex(dst), src) for src, dst in AE_PREFIXES]


def _map_ae_key(key: str, rules, leaves: list[tuple[str, str]], num_up: int) -> str | None:
    for regex, target in rules:
        m = regex.match(key)
        if not m:
            continue
        groups = {k: v for k, v in m.groupdict().items() if k != "rest" and v is not None}
        if "up" in groups:
            groups["up"] = str(num_up - 1 - int(groups["up"]))
        rest = m.group("rest")
        for old, new in leaves:
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        return target.format(**groups) + "." + rest
    return None


def bfl_to_diffusers_ae(sd: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    """Map a BFL/ldm autoencoder state dict (prefix already stripped) to diffusers `AutoencoderKL` keys."""
    out, unknown = {}, []
    for key, value in sd.items():
        new = _map_ae_key(key, _AE_FWD, AE_LEAVES, num_up)
        if new is None:
            unknown.append(key)
            continue
        leaf = new.rsplit(".", 1)[0]
        if leaf.endswith(AE_CONV1X1_LEAVES) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    if unknown:
        raise CheckpointError(f"unexpected autoencoder keys {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    return out


def diffusers_to_bfl_ae(sd: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    """Inverse of `bfl_to_diffusers_ae` (writes the BFL `ae.safetensors` layout, 1x1 convs included)."""
    inverse_leaves = [(new, old) for old, new in AE_LEAVES]
    out = {}
    for key, value in sd.items():
        new = _map_ae_key(key, _AE_BWD, inverse_leaves, num_up)
        if new is None:
            raise CheckpointError(f"unexpected diffusers autoencoder key '{key}'")
        if key.rsplit(".", 1)[0].endswith(AE_CONV1X1_LEAVES) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out

