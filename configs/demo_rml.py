# CPU demo on RML: the synthetic RML twin, demo widths (those of configs/demo.py), the
# by-user split (its recommended 10 epochs). Make the twin and its splits first:
#   python3 -m prepare.synth_rml --root=synth_rml/demo/RML --clips_per_emotion=5 \
#       --duration_scale=0.5
#   python3 -m prepare.read_rml --root=synth_rml/demo/RML --split_by=user \
#       --data_path=data_rml_demo_by_user
# then: python3 main.py configs/demo_rml.py [--modify_modal=True] [--pretrained=True
#   --pretrained_timestamp=<a run of configs/demo.py>]   (see docs/rml.md)
message = 'CPU demo: reduced-width CM-VQVAE on the synthetic RML twin (by-user split)'
dataset = 'RML'
data_path = 'data_rml_demo_by_user'
num_epoch = 10
batch_size = 32
learning_rate = 2e-3
num_hiddens = 32
num_residual_hiddens = 8
embedding_dim = 16
num_embeddings = 64
