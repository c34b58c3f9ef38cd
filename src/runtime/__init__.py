"""The machinery that runs a command around Lightning: run folders, checks, safe checkpoints,
fault tolerance and signals, the callbacks every run gets, and the one workaround module.

Read it, rarely edit it: it names no dataset or model. What a template user edits lives in
:mod:`src.models`, :mod:`src.data`, :mod:`src.callbacks` and ``configs/``.
"""
