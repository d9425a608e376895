"""In-process teacher: an HF causal LM that scores a whole rollout buffer in length-bucketed batches.

For each completion position t of row i the teacher's distribution is
    p_t = softmax(lm_head(h_t) / temperature),
where h_t is the final hidden state at the position that predicts completion token t.
Logits are produced from hidden states in chunks of positions (`chunk_positions`), so the buffer's
(N, T, V) logits never exist; what is kept is what the loss asked for: the logprob of each actual
token, optionally top-k ids/logprobs, logprobs at query ids, or the hidden states themselves
(for exact full-vocabulary losses computed chunk by chunk in the trainer).

The same `score_rows` function serves the HTTP server's hf backend.
"""

from __future__ import annotations

import torch
from torch import nn

from protege.diagnostics import entropy_from_logprobs
from protege.forward import HiddenStates, check_supported, completion_hidden, length_batches, output_weight, pack_rows
from protege.teacher.base import Capabilities, ScoreRequest, Teacher
from protege.records import Rollouts, TeacherSignal


@torch.no_grad()
def score_rows(model: nn.Module, prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor,
               completion_mask: torch.Tensor, request: ScoreRequest, *, pad_id: int,
               token_budget: int = 16384, chunk_positions: int = 2048) -> TeacherSignal:
    """Score N rows. completion_ids/mask (N, T); request.query_ids (N, T, M) or None."""
    if request.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {request.temperature}")
    n, t = completion_ids.shape
    weight = output_weight(model)  # (V, H)
    device = weight.device
    vocab = weight.shape[0]
    hidden_model = HiddenStates(model)
    k = min(request.topk, vocab)
    token_lp = torch.zeros((n, t), dtype=torch.float32)  # (N, T)
    topk_ids = torch.zeros((n, t, k), dtype=torch.long) if k else None  # (N, T, k)
    topk_lp = torch.zeros((n, t, k), dtype=torch.float32) if k else None  # (N, T, k)
    query = request.query_ids
    query_lp = torch.zeros(query.shape, dtype=torch.float32) if query is not None else None  # (N, T, M)
    entropy = torch.zeros((n, t), dtype=torch.float32) if request.entropy else None  # (N, T)
    hidden_out = torch.zeros((n, t, weight.shape[1]), dtype=weight.dtype) if request.hidden else None  # (N, T, H)
    lengths = [len(p) + int(m.sum()) for p, m in zip(prompt_ids, completion_mask)]
    for rows in length_batches(lengths, token_budget):
        mask = completion_mask[rows]  # (b, T)
        tb = int(mask.sum(1).max())
        if tb == 0:
            continue
        input_ids, attention, plens, clens = pack_rows([prompt_ids[i] for i in rows], completion_ids[rows], mask, pad_id)
        hidden = hidden_model(input_ids.to(device), attention.to(device))  # (b, S, H)
        h = completion_hidden(hidden, plens, clens, tb)  # (b, tb, H)
        if hidden_out is not None:
            hidden_out[rows, :tb] = h.to(hidden_out.dtype).cpu()
        flat_mask = mask[:, :tb].reshape(-1).to(device)  # (b*tb,)
        flat_h = h.reshape(-1, h.shape[-1])[flat_mask]  # (n_tok, H)
        flat_tokens = completion_ids[rows, :tb].reshape(-1).to(device)[flat_mask]  # (n_tok,)
        flat_query = query[rows, :tb].reshape(-1, query.shape[-1]).to(device)[flat_mask] if query is not None else None
        tok, ids, lps, qlp, ent = [], [], [], [], []
        for s, logprobs in _chunk_logprobs(flat_h, weight, request.temperature, chunk_positions):  # (c, V)
            tok.append(logprobs.gather(-1, flat_tokens[s:s + chunk_positions, None]).squeeze(-1))
            if k:
                v, i = logprobs.topk(k, dim=-1)
                lps.append(v)
                ids.append(i)
            if entropy is not None:
                ent.append(entropy_from_logprobs(logprobs))
            if flat_query is not None:
                qlp.append(logprobs.gather(-1, flat_query[s:s + chunk_positions]))
        place = mask[:, :tb]  # (b, tb) bool, where flat values go back
        _scatter(token_lp, rows, tb, place, torch.cat(tok).cpu())
        if k:
            _scatter(topk_ids, rows, tb, place, torch.cat(ids).cpu())
            _scatter(topk_lp, rows, tb, place, torch.cat(lps).cpu())
        if entropy is not None:
            _scatter(entropy, rows, tb, place, torch.cat(ent).cpu())
        if flat_query is not None:
            _scatter(query_lp, rows, tb, place, torch.cat(qlp).cpu())
    return TeacherSignal(token_logprobs=token_lp, topk_ids=topk_ids, topk_logprobs=topk_lp, query_logprobs=query_lp,
                         entropy=entropy, hidden_states=hidden_out)


def _chunk_logprobs(flat_h: torch.Tensor, weight: torch.Tensor, temperature: float, chunk: int):
    """Yield (start, log_softmax(flat_h[start:start+c] @ weight.T / temperature)) chunk by chunk, (c, V) float32.

    The logits and logprobs live in buffers allocated once per call and reused by every chunk (a
    view of them is yielded: read it before the next step). A fresh (c, V) tensor per chunk left the
    process resident set gigabytes larger after one big request: small tensors kept between chunks
    split the freed 25 MB blocks, so glibc kept taking new ones. Same values bit for bit; the resident
    memory of both ways is measured by bench/bench_server_memory.py (results/server_memory.md).
    """
    n = flat_h.shape[0]
    if n == 0:
        return
    rows = min(chunk, n)
    logits = torch.empty((rows, weight.shape[0]), dtype=weight.dtype, device=weight.device)  # (c, V)
    wide = logits if weight.dtype == torch.float32 else torch.empty(logits.shape, dtype=torch.float32,
                                                                    device=weight.device)  # (c, V) f32
    out = torch.empty_like(wide)  # (c, V) f32
    for s in range(0, n, chunk):
        c = min(chunk, n - s)
        torch.mm(flat_h[s:s + c], weight.T, out=logits[:c])
        if wide is not logits:
            wide[:c].copy_(logits[:c])
        wide[:c].div_(temperature)
        yield s, torch.log_softmax(wide[:c], dim=-1, out=out[:c])


def _scatter(out: torch.Tensor, rows: list[int], tb: int, place: torch.Tensor, values: torch.Tensor) -> None:
    block = out[rows, :tb]  # (b, tb, ...) copy
    block[place] = values.to(out.dtype)
    out[rows, :tb] = block


class LocalTeacher(Teacher):
    """A teacher model held in this process (its own dtype and device).

    identity: what names it in checkpoints (teacher.path, dtype; the builder gives it), {"kind": "in-process"}
    merged in."""

    def __init__(self, model: nn.Module, *, pad_id: int, token_budget: int = 16384, chunk_positions: int = 2048,
                 identity: dict | None = None):
        check_supported(model, "teacher")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pad_id = pad_id
        self.token_budget = token_budget
        self.chunk_positions = chunk_positions  # positions per (chunk, V) logits block while scoring
        self.output_weight = output_weight(model).detach()  # (V, H): exact logits from hidden states, on its device
        self.vocab_size = self.output_weight.shape[0]
        self.identity = {"kind": "in-process", **(identity or {})}

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(generates=True, identity=dict(self.identity))

    def generator(self, *, pad_id: int, batch_tokens: int, tokenizer=None):
        """HF generate on its own model (mix.seq_kd)."""
        from protege.rollout.hf import HFEngine

        return HFEngine(self.model, pad_id=pad_id, batch_tokens=batch_tokens)

    def score(self, rollouts: Rollouts, request: ScoreRequest) -> TeacherSignal:
        return score_rows(self.model, rollouts.prompt_ids, rollouts.completion_ids, rollouts.completion_mask,
                          request, pad_id=self.pad_id, token_budget=self.token_budget,
                          chunk_positions=self.chunk_positions)
