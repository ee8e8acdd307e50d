"""Data preparation commands, run from the checkout root as modules:

    python3 -m prepare.synth_cremad    a synthetic CREMA-D twin
    python3 -m prepare.synth_rml       a synthetic RML twin
    python3 -m prepare.synth_emo       a synthetic EmoVoxCeleb twin
    python3 -m prepare.read_rml        RML split configs (data_rml, data_rml_by_user)
    python3 -m prepare.read_emo        EmoVoxCeleb split files (data_emo)
    python3 -m prepare.make_features   RML_feat feature folders

CREMA-D's split configs come from read_cremad.py at the top level.
"""
