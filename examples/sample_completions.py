"""Sample one completion per prompt from a model into a JSONL of {"prompt", "completion"} rows.

    python examples/sample_completions.py --model smollm2 --n 16 --out completions.jsonl

For offline on-policy distillation (`protege cache-teacher`, docs/remote_teachers.md) the model must
be the student you are about to train: then the rows are its own samples (on-policy for its first
step); completions from any other model are off-policy rows. The trainer tokenizes the saved text
again, which for a BPE tokenizer can now and then split a word differently from how it was sampled.
"""

from __future__ import annotations

import argparse
import json

import torch

from protege.data import Example, PromptTokenizer, load_rows
from protege.modeling import eos_ids, load_model, load_tokenizer
from protege.rollout.base import Sampling
from protege.rollout.hf import HFEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the student: HF folder, hub id, .gguf or smollm2")
    ap.add_argument("--prompts", default="builtin:everyday")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0, help="use the run's rollout.temperature")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok, model = load_tokenizer(args.model), load_model(args.model).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    texts = [r["prompt"] for r in load_rows(args.prompts)[: args.n]]
    ids = [PromptTokenizer(tok, 512).prompt_ids(Example(messages=[{"role": "user", "content": t}])) for t in texts]
    torch.manual_seed(args.seed)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, eos_ids=tuple(eos_ids(tok)), temperature=args.temperature)
    rows = HFEngine(model, pad_id=tok.pad_token_id).generate(ids, sampling)
    with open(args.out, "w", encoding="utf-8") as f:
        for text, c, m in zip(texts, rows.completion_ids, rows.completion_mask):
            f.write(json.dumps({"prompt": text, "completion": tok.decode(c[m], skip_special_tokens=True)}) + "\n")
    print(f"wrote {len(texts)} rows to {args.out}")


if __name__ == "__main__":
    main()
