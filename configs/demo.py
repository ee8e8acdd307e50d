# CPU demo: a 12-actor synthetic CREMA-D twin (made on first use) and reduced widths.
# python3 main.py configs/demo.py   (about 4 minutes on 2 cores, see README.md)
# python3 main_separate.py configs/demo.py   (two-stage: num_epoch VQ-VAE + num_epoch solver epochs)
message = 'CPU demo: reduced-width CM-VQVAE on a 12-actor synthetic CREMA-D twin'
data_path = 'data_cremad_demo'
twin_actors = 12
twin_root = 'synth_cremad/demo/CREMA-D'
num_epoch = 12
batch_size = 32
learning_rate = 2e-3
num_hiddens = 32
num_residual_hiddens = 8
embedding_dim = 16
num_embeddings = 64
