"""The mPnP connection: modality tokens enter the last N LLM blocks as extra keys/values.

- :mod:`aligners.config` — :class:`ConnectionConfig`, :class:`ModalitySpec` (torch-free).
- :mod:`aligners.kv_aligner` — key/value aligners and positional embeddings per modality.
- :mod:`aligners.connections` — latent connections ``α_j = sigmoid(w_j / T)``.
- :mod:`aligners.injection` — the attention hook (``[α_j K_mm; K_txt]``).
- :mod:`aligners.lora` — LoRA on ``k_proj``/``v_proj`` of the connected blocks.
- :mod:`aligners.model` — :class:`MPnPModel`, the resident LLM with elastic states.
- :mod:`aligners.state` — save/load of adapted states (:class:`StateData` outside a model).
- :mod:`aligners.compose` — training-free composition of states (NaiveMC, DAMC).

Import the torch-dependent pieces from their modules; this package import stays light.
"""

from aligners.config import ConnectionConfig, ModalitySpec

__all__ = ["ConnectionConfig", "ModalitySpec"]
