"""Make a smaller student by dropping decoder layers from a llama/qwen/mistral-style causal LM.

Two ways to choose the layers to keep (the first and the last are always kept):

- "even": evenly spaced over the stack, e.g. 24 of 30 keeps 0, 1, 3, 4, ..., 28, 29.
- "similarity": run sample prompts through the model and measure, for each layer, the mean cosine
  similarity between the hidden states entering and leaving it (over non-pad tokens). A layer
  whose output is nearly its input does little; keep the `keep` layers that change it most
  (the "unreasonable ineffectiveness of the deeper layers" / ShortGPT block-influence criterion).

Dropping a layer also fixes what indexes layers: `config.num_hidden_layers`, per-layer config
lists (`layer_types`, `no_rope_layers`), `max_window_layers`, and the `layer_idx` of every
attention module (the KV cache is indexed by it), so `generate` with a cache works and
`save_pretrained` / `from_pretrained` round-trip.

    >>> from protege.prune import prune_checkpoint
    >>> from protege.modeling import find_smollm2
    >>> prune_checkpoint(find_smollm2(), "outputs/student-24", keep=24)["kept_layers"][:4]
    [0, 1, 3, 4]
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Sequence

import torch

STRATEGIES = ("even", "similarity")
# Config fields that hold one entry per decoder layer and must follow the kept layers.
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers of a llama/qwen/mistral-style causal LM."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(
            f"cannot find the decoder layers of {type(model).__name__}: pruning supports models with "
            "`model.model.layers` (llama, qwen2/3, mistral, gemma and similar decoder-only LMs)"
        )
    return layers


def even_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` evenly spaced indices of `num_layers`, always including the first and the last."""
    _check_keep(num_layers, keep)
    if keep == num_layers:
        return list(range(num_layers))
    step = (num_layers - 1) / (keep - 1)  # >= 1, so rounded positions are strictly increasing
    return [int(math.floor(i * step + 0.5)) for i in range(keep)]


def similarity_layers(similarities: Sequence[float], keep: int) -> list[int]:
    """Indices of the `keep` layers that change their input most (lowest similarity), plus first and last.

    `similarities[i]` is the mean cosine similarity between layer i's input and output; the first
    and the last layer are kept whatever their score; ties drop the later layer first.
    """
    num_layers = len(similarities)
    _check_keep(num_layers, keep)
    middle = sorted(range(1, num_layers - 1), key=lambda i: (float(similarities[i]), i))
    return sorted([0, num_layers - 1] + middle[: keep - 2])


@torch.no_grad()
def measure_layer_similarity(
    model,
    tokenizer=None,
    sample_prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """(num_layers,) mean cosine similarity between each layer's input and output hidden states.

    sample_prompts: user messages (chat-templated with `tokenizer` when it has a chat template),
    or lists of token ids (then no tokenizer is needed). Default: 32 built-in training prompts.
    The mean runs over every non-pad token of every prompt.
    """
    prompt_ids = _sample_token_ids(tokenizer, sample_prompts)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(_capture_input(captured, i), with_kwargs=True))
        handles.append(layer.register_forward_hook(_accumulate(captured, i, sums), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            longest = max(len(ids) for ids in chunk)
            input_ids = torch.zeros(len(chunk), longest, dtype=torch.long)  # (B, L), right-padded
            attention_mask = torch.zeros(len(chunk), longest, dtype=torch.long)  # (B, L)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.as_tensor(ids)
                attention_mask[row, : len(ids)] = 1
            captured["mask"] = attention_mask.bool().to(device)
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            count += int(attention_mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return (sums / max(count, 1)).float()


def choose_layers(
    model,
    keep: int,
    strategy: str = "even",
    tokenizer=None,
    sample_prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """Sorted indices of the decoder layers to keep (see the module docstring for the strategies)."""
    num_layers = len(decoder_layers(model))
    if strategy == "even":
        return even_layers(num_layers, keep)
    if strategy == "similarity":
        _check_keep(num_layers, keep)
        return similarity_layers(measure_layer_similarity(model, tokenizer, sample_prompts).tolist(), keep)
    raise ValueError(f"unknown pruning strategy {strategy!r}; use one of {', '.join(map(repr, STRATEGIES))}")


def drop_layers(model, kept_indices: Sequence[int]):
    """Keep only the decoder layers `kept_indices` (in place) and fix up config and layer indices."""
    layers = decoder_layers(model)
    config = model.config
    num_layers = len(layers)
    kept = sorted(set(int(i) for i in kept_indices))
    if not kept or kept[0] < 0 or kept[-1] >= num_layers:
        raise ValueError(f"kept layer indices {list(kept_indices)} must lie in [0, {num_layers - 1}]")
    if getattr(config, "is_heterogeneous", False):
        raise NotImplementedError(
            "pruning a model whose config has per_layer_config overrides is not supported; "
            "choose a model with a homogeneous config"
        )
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():  # attention modules index the KV cache by layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers:
            setattr(config, name, [values[i] for i in kept])
    if isinstance(getattr(config, "max_window_layers", None), int):
        # qwen2/3: layers below max_window_layers use full attention; count the kept ones.
        config.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
    config.num_hidden_layers = len(kept)
    return model


def prune_layers(
    model,
    keep: int,
    strategy: str = "even",
    tokenizer=None,
    sample_prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
):
    """(model, kept_indices): the model with only `keep` decoder layers left (pruned in place)."""
    kept = choose_layers(model, keep, strategy, tokenizer=tokenizer, sample_prompts=sample_prompts)
    return drop_layers(model, kept), kept


def prune_checkpoint(
    src: str | pathlib.Path,
    dst: str | pathlib.Path,
    keep: int,
    strategy: str = "even",
    dtype: str = "float32",
    num_sample_prompts: int = 32,
) -> dict:
    """Load `src` (hub id, HF folder, GGUF or "smollm2"), prune it to `keep` layers, save model and tokenizer to `dst`.

    Returns (and writes to dst/protege_prune.json) a summary: kept layers, layer and parameter
    counts before and after, and the measured layer similarities for the "similarity" strategy.
    """
    from protege.modeling import load_model, load_tokenizer
    from protege.prompts import load_builtin_prompts

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pruning strategy {strategy!r}; use one of {', '.join(map(repr, STRATEGIES))}")
    model = load_model(src, dtype=dtype)
    tokenizer = load_tokenizer(src)
    num_layers = len(decoder_layers(model))
    params_before = model.num_parameters()
    similarities = None
    if strategy == "similarity":
        _check_keep(num_layers, keep)
        prompts = load_builtin_prompts("train")[:num_sample_prompts]
        similarities = measure_layer_similarity(model, tokenizer, prompts).tolist()
        kept = similarity_layers(similarities, keep)
    else:
        kept = choose_layers(model, keep, strategy)
    drop_layers(model, kept)
    dst = pathlib.Path(dst)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    summary = {
        "source": str(src),
        "destination": str(dst),
        "strategy": strategy,
        "kept_layers": kept,
        "num_layers_before": num_layers,
        "num_layers_after": len(kept),
        "params_before": params_before,
        "params_after": model.num_parameters(),
        "layer_similarity": similarities,
    }
    (dst / "protege_prune.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_keep(num_layers: int, keep: int) -> None:
    if not isinstance(keep, int) or not (min(2, num_layers) <= keep <= num_layers):
        raise ValueError(
            f"keep={keep!r} layers is not possible for a model with {num_layers} decoder layers; "
            f"use an integer from {min(2, num_layers)} (first and last layer) to {num_layers}"
        )


def _sample_token_ids(tokenizer, sample_prompts) -> list[list[int]]:
    """Token ids of each sample prompt (chat-templated user messages when a template exists)."""
    if sample_prompts is None:
        from protege.prompts import load_builtin_prompts

        sample_prompts = load_builtin_prompts("train")[:32]
    if not sample_prompts:
        raise ValueError("sample_prompts is empty; the similarity strategy needs at least one prompt")
    if all(not isinstance(p, str) for p in sample_prompts):
        return [list(map(int, p)) for p in sample_prompts]
    if tokenizer is None:
        raise ValueError(
            "the similarity strategy got text sample_prompts but no tokenizer; pass tokenizer= "
            "or give sample_prompts as lists of token ids"
        )
    out = []
    for prompt in sample_prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            out.append(tokenizer(prompt)["input_ids"])
    return out


def _capture_input(captured: dict, index: int):
    def hook(module, args, kwargs):
        captured[index] = args[0] if args else kwargs["hidden_states"]  # (B, L, H)

    return hook


def _accumulate(captured: dict, index: int, sums: torch.Tensor):
    def hook(module, args, kwargs, output):
        hidden_out = output[0] if isinstance(output, (tuple, list)) else output  # (B, L, H)
        hidden_in = captured.pop(index)
        cosine = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # (B, L)
        sums[index] += cosine[captured["mask"]].double().sum().cpu()

    return hook
