"""Structural (channel) pruning: the channel dependency graph, channel selection, dead-channel
propagation and physical resizing.

Modules: :mod:`.graph` (dims, union-find, groups), :mod:`.rules` (one rule per op type),
:mod:`.select` (scores and selection), :mod:`.resize` (mask and resize), :mod:`.dead` (dead
channels and exact constant folding). The pipeline that runs them is
:mod:`onnxprune.passes.structure` (``PruneChannels``, ``RemoveDeadChannels``):

>>> from onnxprune.model.io import load
>>> from onnxprune.channels.graph import build_channel_graph
>>> from onnxprune.channels.select import select_channels
>>> from onnxprune.channels.resize import mask_channels, resize_channels
>>> handle = load("model.onnx")                                     # doctest: +SKIP
>>> graph = build_channel_graph(handle)                             # doctest: +SKIP
>>> [(g.describe(), g.frozen) for g in graph.groups]                # doctest: +SKIP
>>> removed = select_channels(handle, graph, 0.3, round_to=8)       # doctest: +SKIP
>>> mask_channels(handle, removed, graph)                           # doctest: +SKIP
>>> resize_channels(handle, graph, removed)                         # doctest: +SKIP
"""
