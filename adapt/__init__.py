"""Adaptation: training connectors on (frames, question, answer) and Algorithm 1.

- :mod:`adapt.features` — QA items with the frozen encoders' tokens of their frames.
- :mod:`adapt.connectors` — one interface for mPnP and every baseline, with a registry.
- :mod:`adapt.trainer` — the training loop (measured FLOPs, memory, time; resumable).
- :mod:`adapt.evaluate` — exact-match accuracy overall, per type and per type × hop.
- :mod:`adapt.algorithm` — offline preparation and runtime Select → Reconnect → Adapt.
"""
