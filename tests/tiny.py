"""Tiny models and a character-level chat tokenizer built in the tests (no network, no hub)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + list(string.printable[:95]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=SPECIALS[3:])
    out.chat_template = CHAT_TEMPLATE
    return out


def make_model(layers: int, seed: int, hidden: int = 48, vocab: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a peakier teacher/student than the default init, so the KL is sizeable
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def make_plain_model(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 Llama at its default init, in eval mode: the server and client tests' teacher."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def write_models(root: Path) -> dict[str, str]:
    tok = make_tokenizer()
    paths = {}
    for name, layers, seed in (("teacher", 3, 1), ("student", 2, 2)):
        d = root / name
        make_model(layers, seed).save_pretrained(d)
        tok.save_pretrained(d)
        paths[name] = str(d)
    return paths


def write_dataset(path: Path, n: int = 40, with_reference: bool = True) -> str:
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        row = {"prompt": f"what is {a}+{b}?"}
        if with_reference:
            row["completion"] = f"{a + b}"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def free_port() -> int:
    """A TCP port nothing listens on now (for torch.distributed's master port in multi-process tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
