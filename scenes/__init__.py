"""Driving data for mPnP: the synthetic day/night world and the nuScenes-QA loader.

Both sources yield the same types (:class:`scenes.sample.Frame`, :class:`scenes.sample.QAItem`),
so everything downstream is source-agnostic.
"""
