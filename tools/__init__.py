"""Tools around runs, run from the checkout root as modules:

    python3 -m tools.probe              what a run's shared and private channels hold
    python3 -m tools.predict            emotions of single clips with a saved run
    python3 -m tools.sweep              a grid of main.py runs over seeds, with statistics
    python3 -m tools.bench              throughput of loading, steps and epochs
    python3 -m tools.convert_released   a run folder of the released code -> one of main.py
    python3 -m tools.parity             trainable parameters per model at the header's widths
"""
