"""Tiny randomly initialised LLMs of every supported family, with a character tokenizer.

For tests and ``--quick`` benchmarks: they exercise exactly the code paths of the real models
(same transformers classes, grouped-query attention where the family has it) at a size that
runs in milliseconds on a CPU. Nothing is downloaded.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mpnp.llm import SUPPORTED_FAMILIES, prepare_tokenizer

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (ids 0–3 are special)."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    prepare_tokenizer(tok)
    return tok


def tiny_config(family: str, vocab_size: int, num_layers: int = 4, hidden: int = 64):
    from transformers import AutoConfig

    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {SUPPORTED_FAMILIES}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "opt":
        return AutoConfig.for_model(
            "opt",
            ffn_dim=2 * hidden,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            **common,
        )
    return AutoConfig.for_model(
        family,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )


def tiny_llm(
    family: str = "llama",
    num_layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A random ``family`` model and the character tokenizer, frozen and in eval mode."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(family, len(tok), num_layers, hidden)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    model.eval().requires_grad_(False)
    return model, tok


#: Paper-sized shapes for speed and memory measurements with random weights (no hub here).
PAPER_SIZES: dict[str, dict] = {
    "opt-1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192,
                 "num_attention_heads": 32, "word_embed_proj_dim": 2048},
}


def random_paper_llm(name: str, tokenizer, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", seed: int = 0):
    """A randomly initialised model with a paper model's shapes (e.g. ``opt-1.3b``).

    Accuracy is meaningless with random weights; samples/s, FLOPs and memory are what the
    paper's model would cost. ``tokenizer`` (any) supplies the vocabulary size and ids.
    """
    from transformers import OPTConfig

    if name not in PAPER_SIZES:
        raise ValueError(f"unknown paper model {name!r}; choose from {sorted(PAPER_SIZES)}")
    torch.manual_seed(seed)
    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    cfg = OPTConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                    pad_token_id=ids["pad"] or 0, bos_token_id=ids["bos"] or 0,
                    eos_token_id=ids["eos"] or 0, **PAPER_SIZES[name])
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False)
