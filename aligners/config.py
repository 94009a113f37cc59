"""Configuration of the mPnP connection (importable without torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

GATES = ("scale", "logit")
ALIGNER_KINDS = ("mlp", "linear")
ALIGNER_SPACES = ("kv", "hidden")


@dataclass
class ConnectionConfig:
    """How modality tokens are connected to the last ``num_blocks`` blocks of the LLM.

    Defaults are the official code's hyperparameters (mPnP-LLM, arXiv 2312.07886).

    Attributes:
        num_blocks: N, how many of the last blocks are connected (the elastic knob).
        temperature: T in ``α_j = sigmoid(w_j / T)``.
        gate: ``"scale"`` — the paper's ``[α_j K_mm; K_txt]``; ``"logit"`` — unscaled K_mm with
            ``log α_j`` added to the multimodal attention logits, so α → 0 really removes the
            tokens from the softmax (a variant to evaluate, not the reference).
        aligner_kind: ``"mlp"`` (``GELU(xW1+b1)W2+b2``) or ``"linear"`` (ablation).
        aligner_hidden_mult: hidden width of the MLP aligner as a multiple of the encoder width.
        positional_embeddings: learned ``T_pos`` added to the multimodal K/V (ablation: off).
        train_connections: whether the connection weights ``w_j`` train (ablation: fixed).
        lora: LoRA on ``k_proj``/``v_proj`` of the connected blocks (ablation: off).
        lora_r, lora_alpha, lora_dropout: LoRA hyperparameters (official: 8, 32, 0.1).
        init_alpha: ``None`` — the official ``w ~ U(-1, 1)``; a value in (0, 1) starts every
            connection at that α (``w = T·logit(α)``). With the logit gate a small value
            starts the injection nearly closed: the base LLM is almost intact at step 0 and
            the connections open where the tokens help.
        aligner_space: ``"kv"`` — the paper's aligners output keys/values directly, the same
            ones in every connected block; ``"hidden"`` — they output a hidden state ``u``
            (the LLM's width) per token and each connected block ``j`` makes its own keys and
            values with its frozen projections, ``K_j = k_proj_j(norm_j(u_k))``,
            ``V_j = v_proj_j(norm_j(u_v))`` (LoRA not applied: it stays on text tokens). The
            tokens then land in each block's own K/V space at text scale (README: How the
            connection works).
        block_maps: a head-wise ``head_dim × head_dim`` map per block on the modality's keys
            and values, initialised to the identity, so one token can match what each block
            expects (modality parameters: saved and composed with the aligners).
    """

    num_blocks: int = 8
    temperature: float = 1.0
    gate: str = "scale"
    aligner_kind: str = "mlp"
    aligner_hidden_mult: int = 4
    positional_embeddings: bool = True
    train_connections: bool = True
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    init_alpha: float | None = None
    aligner_space: str = "kv"
    block_maps: bool = False

    def __post_init__(self) -> None:
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.aligner_kind not in ALIGNER_KINDS:
            raise ValueError(
                f"aligner_kind must be one of {ALIGNER_KINDS}, got {self.aligner_kind!r}"
            )
        if self.aligner_space not in ALIGNER_SPACES:
            raise ValueError(
                f"aligner_space must be one of {ALIGNER_SPACES}, got {self.aligner_space!r}"
            )
        if self.aligner_hidden_mult < 1:
            raise ValueError("aligner_hidden_mult must be >= 1")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ValueError("lora_r must be >= 1 and lora_alpha > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init_alpha is not None and not 0.0 < self.init_alpha < 1.0:
            raise ValueError(f"init_alpha must be in (0, 1) or None, got {self.init_alpha}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ConnectionConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ConnectionConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class ModalitySpec:
    """What an encoder hands to the connection: ``num_tokens`` tokens of width ``embed_dim``."""

    name: str
    embed_dim: int
    num_tokens: int

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"modality name must be alphanumeric/underscore, got {self.name!r}")
        if self.embed_dim < 1 or self.num_tokens < 1:
            raise ValueError(f"{self.name}: embed_dim and num_tokens must be >= 1")
