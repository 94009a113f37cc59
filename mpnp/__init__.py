"""mPnP: runtime modality adaptation for a resident decoder-only LLM.

The importable core lives in sibling top-level packages chosen by the product's design:

- ``aligners``  — the mPnP connection: K/V aligners, latent connections, injection, LoRA, state.
- ``encoders``  — frozen sensor encoders (camera ViT, LiDAR range-image ViT) behind one registry.
- ``scenes``    — the synthetic driving world and the nuScenes-QA loader (one sample type).
- ``policies``  — context policies (light level) and budget planning.
- ``daemon``    — the long-running process around the core.

This package holds the glue: paths of the model store, LLM loading, answers, generation, CLI.
"""

__version__ = "0.1.0"
