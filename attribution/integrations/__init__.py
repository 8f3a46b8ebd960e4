"""Adapters that let other tools use the engine (each imports its tool only when used).

``attribution.integrations.quanda``: :class:`HistoryExplainer`, a quanda ``Explainer`` backed by
a store, so quanda's metrics (class detection, mislabel detection, LDS, model randomisation, ...)
evaluate this library's methods unchanged. Needs the ``quanda`` extra (see README).
"""
