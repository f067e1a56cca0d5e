"""What discovery must refuse rather than silently drop or misread (pure: tensors in, errors out).

Weights saved under other names (pruning and parametrization reparametrizations, unmerged LoRA adapters,
a tied weight stored once), 0-/1-D tensors named like the chain's weights, and normalization layers that
sit inside the MLP: building a chain without any of them would compute another network.
"""

from __future__ import annotations

import re

import torch

from .errors import FPEError
from .model import Layer
from .names import bias_candidates, family, natural_key


def refuse_flat_weights(tensors: dict[str, torch.Tensor], named: list[str]) -> None:
    """A 0-/1-D tensor named like the chain's weights (`1.weight` beside `0.weight`/`2.weight`), or
    whose bias has another length, sits where a linear weight is expected: a corrupt file or a layer
    fpe cannot expand through. Skipping it would silently change the network. A norm (1-D weight and
    bias of one length) is left to `_refuse_norms_inside`: at the input or output width it is outside."""
    families = {family(k) for k in named}
    for key, t in sorted(tensors.items(), key=lambda kv: natural_key(kv[0])):
        if t.ndim >= 2 or not key.lower().endswith("weight"):
            continue
        bias = next((tensors[b] for b in bias_candidates(key) if b in tensors), None)
        if t.ndim == 1 and bias is not None and tuple(bias.shape) == tuple(t.shape):
            continue  # a norm's affine parameters: where it sits is decided by its width (_refuse_norms_inside)
        if named and (family(key) in families or (bias is not None and tuple(bias.shape) != tuple(t.shape))):
            linear = sorted(named, key=natural_key)
            raise FPEError(
                f"{key}: a {t.ndim}-D tensor {tuple(t.shape)} where a 2-D linear weight is expected "
                f"(beside {', '.join(linear[:4])})",
                "fpe reads MLPs of 2-D linear weights; if the file is intact, name the linear layers with --layers",
            )


LORA_NAME = re.compile(r"(^|\.)(lora_[AB]|lora_down|lora_up|lora_embedding_[AB])(\.|$)")


def _lora_adapter(key: str, tensors: dict[str, torch.Tensor]) -> bool:
    """`fc1.lora_A.weight` (or PEFT's `fc1.lora_A.default.weight`) beside the base weight it adapts
    (`fc1.weight` or `fc1.base_layer.weight`); a layer that is merely named `lora_A` is a layer."""
    m = LORA_NAME.search(key)
    if m is None:
        return False
    prefix = key[: m.start()]
    return any(f"{prefix}.{base}" in tensors for base in ("weight", "base_layer.weight")) if prefix else False


def refuse_hidden_weights(tensors: dict[str, torch.Tensor], named: list[str]) -> None:
    """Weights torch saves under other names (pruning and parametrization reparametrizations), and a
    bias whose weight is missing (a tied weight that `safetensors.torch.save_model` stored only once):
    discovery would silently build a chain without that layer."""
    for key in sorted(tensors, key=natural_key):
        if key.endswith("weight_orig") and key[: -len("orig")] + "mask" in tensors:
            raise FPEError(
                f"{key} and {key[:-len('orig')]}mask: a torch.nn.utils.prune reparametrization, not a plain weight",
                "call torch.nn.utils.prune.remove(module, 'weight') on each pruned layer before saving; "
                "pruned weights are then exact zeros, which fpe counts as missing",
            )
        if _lora_adapter(key, tensors):
            raise FPEError(
                f"{key}: an unmerged LoRA adapter; the layer it adapts computes W + B @ A * scale, not its base weight",
                "merge the adapters before saving (peft: model.merge_and_unload(); by hand: W += B @ A * "
                "lora_alpha / r), or name the base layers with --layers to expand them without the adapters",
            )
        if ".parametrizations." in key:
            raise FPEError(
                f"{key}: a torch parametrization (weight_norm, spectral_norm, ...), not a plain weight",
                "call torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') before saving",
            )
    families = {family(k) for k in named}
    for key in sorted(tensors, key=natural_key):
        if not key.endswith(".bias") or tensors[key].ndim != 1:
            continue
        weight = key[: -len("bias")] + "weight"
        if weight not in tensors and family(weight) in families:
            raise FPEError(
                f"{key} has no {weight} beside it: a layer of the MLP is missing from the file; "
                "safetensors.torch.save_model stores a tied (shared) weight only once",
                "save a state_dict with every weight, e.g. save_file({k: v.clone() for k, v in "
                "model.state_dict().items()}, path), or name the chain with --layers",
            )


# the two input branches of a gated MLP (GLU/SwiGLU: down(act(gate x) * (up x))), as Llama/Mistral
# (`gate_proj`/`up_proj`, `w1`/`w3`), T5 (`wi_0`/`wi_1`) and others name them
GATE_PARTNERS = {"gate_proj": "up_proj", "up_proj": "gate_proj", "w1": "w3", "w3": "w1", "wi_0": "wi_1",
                 "wi_1": "wi_0", "gate": "up", "up": "gate"}
# short names a plain MLP may use too (`w1`, `w2`, `w3` for three layers): gated only inside a feed-forward
# block and where the branch widens (a gated block's branches are (h, d) with h != d)
GENERIC_BRANCHES = {"w1", "w3", "gate", "up"}
FFN_WORDS = ("feed_forward", "feedforward", "ffn", "mlp", "expert")


def gate_partner(key: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """The other input branch of the gated MLP that weight `key` belongs to, if the file holds one: a
    tensor of the same module named as the key's partner (`mlp.gate_proj.weight` -> `mlp.up_proj.weight`)
    with the same shape."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        partner = GATE_PARTNERS.get(parts[i])
        if partner is None:
            continue
        square = tensors[key].ndim == 2 and tensors[key].shape[0] == tensors[key].shape[1]
        if parts[i] in GENERIC_BRANCHES and (square or not any(w in p.lower() for p in parts[:i] for w in FFN_WORDS)):
            return None  # a gated block widens (h != d); square `mlp.w1`/`mlp.w3` are layers of a plain MLP
        other = ".".join(parts[:i] + [partner] + parts[i + 1:])
        if other in tensors and tuple(tensors[other].shape) == tuple(tensors[key].shape):
            return other
        return None
    return None


def refuse_gated(keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """A layer of a gated MLP (named with --layers or found by shape) without its partner branch: the block
    computes down(act(gate x) * (up x)), a product of two branches, which no chain of linear layers is."""
    for key in keys:
        other = gate_partner(key, tensors)
        if other is not None and other not in keys:
            raise FPEError(
                f"{key} and {other}: the two input branches of a gated MLP (GLU/SwiGLU: down(act(gate x) * (up x))); "
                "the product of two branches is not a chain of linear layers, so FPE does not apply to it",
                "fpe expands plain MLPs (Linear, activation, Linear, ...); a gated block cannot be expanded by fpe",
            )


NORM_STATS = ("running_mean", "running_var")


def _norm_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Tensors of a normalization layer -> its width: a 1-D weight with a bias of the same shape
    (LayerNorm/BatchNorm affine parameters) or BatchNorm's running statistics."""
    found = {}
    for key, t in tensors.items():
        if t.ndim != 1:
            continue
        if key.endswith(NORM_STATS):
            found[key] = t.numel()
        elif key.lower().endswith("weight"):
            bias = next((b for b in bias_candidates(key) if b in tensors), None)
            if bias is not None and tuple(tensors[bias].shape) == tuple(t.shape):
                found[key] = found[bias] = t.numel()
    return found


def refuse_norms_inside(layers: list[Layer], unused: dict[str, torch.Tensor]) -> None:
    """A normalization layer whose width is a hidden width sits inside the chain (under its own name,
    e.g. `fc1`, `bn1`, `fc2`): expanding, evaluating or fine-tuning the linear layers without it would
    silently compute another network. Norms at the input or output width stay outside (noted)."""
    hidden = {layer.out_features: i for i, layer in enumerate(layers[:-1])}
    inside = {k: n for k, n in _norm_tensors(unused).items() if n in hidden}
    if not inside:
        return
    names = sorted(inside, key=natural_key)
    width = inside[names[0]]
    chain = ",".join(layer.weight_key for layer in layers)
    raise FPEError(
        f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: a normalization layer (BatchNorm/LayerNorm) "
        f"of width {width}, the output width of {layers[hidden[width]].weight_key}, so it sits inside the MLP; "
        "fpe expands plain MLPs (linear layers and one activation), and leaving it out would change the network",
        "fold it into the linear layer it follows and save again (Linear -> BatchNorm, eval mode: scale = "
        "weight / sqrt(running_var + eps); W *= scale[:, None]; b = (b - running_mean) * scale + bias), or use the "
        f"linear layers alone, leaving the norm out of every output: --layers {chain}",
    )
