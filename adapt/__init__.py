"""Adaptation: training connectors on (frames, question, answer) and Algorithm 1.

- :mod:`adapt.features` — QA items with the frozen encoders' tokens of their frames.
- :mod:`adapt.connectors` — one interface for mPnP and every baseline, with a registry.
- :mod:`adapt.engine` — the one training engine: a resumable stepper of bounded units
  (micro-steps, validation chunks), driven by the trainer and by the daemon.
- :mod:`adapt.precision` — bfloat16 autocast of training steps where the device has the
  units for it.
- :mod:`adapt.trainer` — the epoch loop over it (measured FLOPs, memory, time; resumable).
- :mod:`adapt.evaluate` — exact-match accuracy overall, per type and per type × hop, in
  bounded chunks.
- :mod:`adapt.algorithm` — offline preparation and runtime Select → Reconnect → Adapt.
"""
