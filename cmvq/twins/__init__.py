"""Synthetic twins: CREMA-D, RML and EmoVoxCeleb trees with known generative factors.

render holds the renderer and build machinery every twin shares; cremad, rml and emo
hold each dataset's layout (names, emotion prototypes, containers). The commands
are prepare/synth_cremad.py, prepare/synth_rml.py and prepare/synth_emo.py.
"""
