"""Media and inference for lipstream: audio, features, engines, compositing, rendering.

Nothing in here knows about HTTP, sessions or the network (``server`` imports ``pipeline``,
never the reverse), so every stage can be driven from a test, a benchmark or the CLI alone.
"""
