"""The library beneath the scripts: everything nobody runs directly.

Settings and checks     config (one table of allowed values), configurator (header
                        + overrides), preflight (every check before a run folder)
A run                   experiment (main.py), two_stage (main_separate.py), runs (run
                        folder, log, checkpoints), train (epochs, fit, evaluate),
                        loss, loaders, runtime (device, bf16, compile), outputs
                        (pickles, metrics, plots), plots, groups (per-speaker
                        metrics), tblog (TensorBoard), robustness, transfer
                        (pretrained RML), distributed (torchrun)
Data                    cache (decode once), media (FLV/AVI/WAV/JPEG I/O), splits
                        (split config folders), cremad (CREMA-D splits), pickles
                        (reading the released pickle files), twins/ (the synthetic
                        CREMA-D, RML and EmoVoxCeleb twins)
The released code       released (its checkpoint names -> the project's models)
Plumbing                errors (one-line user errors), atomic (atomic writes),
                        progress (bars on a terminal, lines in a log)

The model family is model.py and model_feat.py, the datasets datasets.py, at the
top level beside the scripts. Nothing here imports a script.
"""
