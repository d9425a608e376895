"""Forward passes that stop at the final hidden states, so no (batch, seq, vocab) logits exist.

A causal LM's logits at sequence position i predict token i+1. For a row made of a prompt of
length P and a completion of length L, the hidden states that predict the completion tokens are
those at positions P-1 ... P+L-2. `completion_hidden` packs those into (N, T, H), aligned with
`Rollouts.completion_ids` (N, T).

The vocabulary projection is applied later, chunk by chunk, by protege.losses; models whose logits
are more than `hidden @ lm_head.T` (soft-capping, logit scaling) are refused with a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from protege.losses.chunked import grad_into_weight


def output_weight(model: nn.Module) -> torch.Tensor:
    """The (V, H) vocabulary projection of a causal LM (PEFT-wrapped or not)."""
    head = _base(model).get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(_base(model)).__name__}: protege needs a bias-free lm_head (output embeddings)")
    return head.weight


def check_supported(model: nn.Module, role: str) -> None:
    """Refuse models whose logits are not a plain projection of the final hidden states."""
    cfg = _base(model).config
    for key in ("final_logit_softcapping", "logit_softcapping"):
        if getattr(cfg, key, None):
            raise ValueError(f"{role} model uses {key}={getattr(cfg, key)}; protege's chunked losses assume "
                             "logits = hidden @ lm_head.T. Pick a model without logit soft-capping.")
    for key in ("logit_scale", "logits_scaling"):
        val = getattr(cfg, key, None)
        if val not in (None, 1, 1.0):
            raise ValueError(f"{role} model scales its logits ({key}={val}); not supported yet.")


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside DDP and PEFT wrappers (the module whose generate and lm_head protege uses)."""
    return _base(model)


def _base(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # PEFT: LoRA layers are injected in place, so the base runs them
        model = model.get_base_model()
    return model


class HiddenStates(nn.Module):
    """Wraps a causal LM so that forward returns final hidden states (B, S, H) instead of logits.

    Wrapping (rather than calling a submodule) keeps DDP's gradient hooks on the path when the
    wrapper itself is handed to accelerate.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """attention_mask (B, S) for padded rows; or None with position_ids restarting at 0 for every packed
        row (protege/packing.py: transformers then masks attention across rows)."""
        decoder = _base(self.model).get_decoder()
        target = grad_into_weight()  # inside the trainer's grad_into block only
        emb = tied_input_embedding(self.model) if target is not None and torch.is_grad_enabled() else None
        if emb is not None and emb.weight is target:  # the tied embedding's gradient as a sparse addend
            embeds = nn.functional.embedding(input_ids, emb.weight, emb.padding_idx, emb.max_norm, emb.norm_type,
                                             emb.scale_grad_by_freq, sparse=True)  # (B, S, H)
            return decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state

    # What accelerate's FSDP2 preparation reads to shard an HF model (one group per decoder layer, a
    # tail group [final norm, embeddings, lm_head]): the wrapped model's answers (protege/fsdp.py).
    base_model_prefix = "decoder"

    @property
    def decoder(self) -> nn.Module:
        return _base(self.model).get_decoder()

    @property
    def _no_split_modules(self):
        return getattr(_base(self.model), "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module:
        return _base(self.model).get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return _base(self.model).get_output_embeddings()


def tied_input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The input embedding when its weight is the trained lm_head's (tied, a plain tensor), else None.

    Memory: the embedding's gradient is dense (V, H) by default, so the end of the backward holds three
    lm_head-sized tensors at once: the loss's gradient of the weight, the embedding's, and autograd's sum of
    the two (SmolLM2: 3 x 113 MB, at the step's peak memory). Taken as a sparse gradient (F.embedding with
    sparse=True: only the rows of the batch's tokens), the embedding's addend is a few rows and the sum is the
    same dense .grad: one (V, H) tensor less. Autograd never adds a sparse addend in place, so the loss hands
    its gradient straight to .grad (protege.losses.grad_into), and the weight's AccumulateGrad adds the sparse
    rows into it in place: no second (V, H) tensor at all. HiddenStates does this only inside that block (the
    trainer's learn), so other callers keep dense gradients; `dense_grads` covers the case where no dense
    addend came. Not for a sharded (FSDP2) or frozen weight, or an embedding module that does more than look
    rows up (Gemma's scaled embedding)."""
    base = _base(model)
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if type(emb) is not nn.Embedding or head is None or head.weight is not emb.weight:
        return None
    w = emb.weight
    return emb if type(w) is nn.Parameter and w.requires_grad and w.layout == torch.strided else None


def dense_grads(model: nn.Module) -> None:
    """Turn any sparse .grad (the tied embedding's, when the loss gave its weight no dense gradient) dense:
    optimizers such as AdamW refuse sparse gradients."""
    for p in model.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


def pack_rows(prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Right-padded (B, S) input ids and attention mask of prompt+completion rows, with each row's
    prompt length and completion length."""
    lengths = completion_mask.sum(1).tolist()
    rows = [torch.cat([p, completion_ids[i, :n]]) for i, (p, n) in enumerate(zip(prompt_ids, lengths))]
    seq = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)  # (B, S)
    attention = torch.zeros((len(rows), seq), dtype=torch.long)  # (B, S)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention[i, : len(r)] = 1
    return input_ids, attention, [len(p) for p in prompt_ids], lengths


def completion_hidden(hidden: torch.Tensor, prompt_lens: list[int], comp_lens: list[int], t: int) -> torch.Tensor:
    """Gather (B, t, H) hidden states that predict each completion token from (B, S, H); zero padded."""
    b, _, h = hidden.shape
    index = torch.zeros((b, t), dtype=torch.long, device=hidden.device)  # (B, t)
    for i, (p, n) in enumerate(zip(prompt_lens, comp_lens)):
        index[i, :n] = torch.arange(p - 1, p - 1 + n, device=hidden.device)
    out = torch.gather(hidden, 1, index.unsqueeze(-1).expand(b, t, h))  # (B, t, H)
    return out


def forward_completion_hidden(model: nn.Module, prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor,
                              completion_mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T, H) final hidden states predicting each completion token, T = completion_ids.shape[1].

    `model` is a HiddenStates wrapper (possibly wrapped again by accelerate/DDP)."""
    device = completion_ids.device
    input_ids, attention, plens, clens = pack_rows(prompt_ids, completion_ids.cpu(), completion_mask.cpu(), pad_id)
    hidden = model(input_ids.to(device), attention.to(device))  # (B, S, H)
    return completion_hidden(hidden, plens, clens, completion_ids.shape[1])


def length_batches(lengths: list[int], token_budget: int, max_rows: int | None = None) -> list[list[int]]:
    """Group row indices (sorted by length, longest first) so that rows * longest <= token_budget.

    A row longer than the budget gets a batch of its own (never dropped)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > token_budget or (max_rows and len(current) >= max_rows)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
