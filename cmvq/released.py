"""Checkpoints of the released code (CyberAgentAILab/CM-VQVAE): its module names
mapped onto the project's models.

The released main.py saves a bare model.state_dict() whose keys name its modules
(_encoder_image._conv_1.weight, _vq_vae_image._ema_w, _classifier.private_shared_mask,
...). load_released loads such a state dict into the project model built with the
same config; tools/convert_released.py turns a released run folder into one that
main.py evaluates.
"""
import model as models
from model import MODALITIES

# The released modules name their stateful layers; the project's Sequentials hold
# the same layers in the same order (ReLU, pooling, dropout and flatten hold no
# state), so the k-th stateful child gets the k-th name below.
_RELEASED_LAYERS = {
    'encoder': ('_conv_1', '_bn_1', '_conv_2', '_bn_2', '_conv_3', '_residual_stack'),
    'decoder_image': ('_conv_1', '_residual_stack', '_conv_trans_1', '_bn', '_conv_trans_2'),
    'decoder_audio': ('_conv_1', '_residual_stack', '_conv_trans_1', '_bn_1',
                      '_conv_trans_2', '_bn_2', '_conv_trans_3'),
    'solver_features': ('_conv1', '_bn_1', '_conv2', '_residual_stack'),
    'solver_head': ('_fc1', '_bn_2', '_fc2'),
    'comparison_head': ('_fc1', '_bn', '_fc2'),
}
_RELEASED_RESNETS = {'image': '_resnet18_1', 'audio': '_resnet18_2'}


def _join(*parts):
    return '.'.join(p for p in parts if p)


def _stack_pairs(stack, ours, theirs):
    """ResidualStack: blocks -> _layers.i._block, the final BN -> _bn."""
    n = len(stack) - 2  # num_layers blocks, then BN and ReLU
    pairs = [(f'{ours}.{i}.block', f'{theirs}._layers.{i}._block') for i in range(n)]
    return pairs + [(f'{ours}.{n}', f'{theirs}._bn')]


def _layer_pairs(seq, ours, theirs, kind):
    """(project prefix, released prefix) for each stateful child of a Sequential."""
    names = _RELEASED_LAYERS[kind]
    stateful = [i for i, child in enumerate(seq) if child.state_dict()]
    assert len(stateful) == len(names), f'{kind}: {len(stateful)} stateful layers'
    pairs = []
    for i, name in zip(stateful, names, strict=True):
        if isinstance(seq[i], models.ResidualStack):
            pairs += _stack_pairs(seq[i], f'{ours}.{i}', _join(theirs, name))
        else:
            pairs.append((f'{ours}.{i}', _join(theirs, name)))
    return pairs


def _backbone_pairs(backbone, prefix):
    """Encoders, pre-VQ convs, quantizers and decoders of a ModelVQVAE."""
    pairs = []
    for m in backbone.modalities:
        ours = _join(prefix, 'encoders', m)
        pairs += _layer_pairs(backbone.encoders[m], ours, f'_encoder_{m}', 'encoder')
        pairs.append((_join(prefix, 'pre_vq', m), f'_pre_vq_conv_{m}'))
        if not backbone.quantize:
            continue
        ours, theirs = _join(prefix, 'quantizers', m), f'_vq_vae_{m}'
        if isinstance(backbone.quantizers[m], models.VectorQuantizerEMA):
            # The released EMA quantizer keeps the codes in an nn.Embedding.
            pairs += [(f'{ours}.embedding', f'{theirs}._embedding.weight'),
                      (f'{ours}.ema_w', f'{theirs}._ema_w'),
                      (f'{ours}.ema_cluster_size', f'{theirs}._ema_cluster_size')]
        else:
            pairs.append((f'{ours}.embedding', f'{theirs}._embedding'))
        pairs += _layer_pairs(backbone.decoders[m], _join(prefix, 'decoders', m),
                              f'_decoder_{m}', f'decoder_{m}')
    return pairs


def _released_pairs(net):
    """[(project prefix, released prefix)] covering every entry of net.state_dict()."""
    if isinstance(net, models.ModelComparison):
        pairs = [(f'nets.{m}', _RELEASED_RESNETS[m]) for m in net.nets]
        return pairs + _layer_pairs(net.classifier, 'classifier', '', 'comparison_head')
    if not isinstance(net, (models.ModelVQVAE, models.SolverModel, models.ModelSolver)):
        raise ValueError(f'load_released supports the CREMA-D models, not {type(net).__name__}')
    pairs = []
    if isinstance(net, models.ModelVQVAE):
        pairs += _backbone_pairs(net, '')
    if isinstance(net, models.SolverModel):
        pairs += _backbone_pairs(net.backbone, 'backbone')
    solver = getattr(net, 'solver', None)
    if solver is not None:
        if solver.mask is not None:
            pairs.append(('solver.mask', '_classifier.private_shared_mask'))
        pairs += _layer_pairs(solver.features, 'solver.features', '_classifier',
                              'solver_features')
        pairs += _layer_pairs(solver.classifier, 'solver.classifier', '_classifier',
                              'solver_head')
    return pairs


def _unbuilt_prefixes(net):
    """Released prefixes of modules the released code builds but never uses, which
    the project does not build: the VQ modules and decoders of base_type 1 and 3,
    the unused modality's encoder there and its ResNet in base_type 4."""
    if isinstance(net, models.ModelComparison):
        return tuple(f'{_RELEASED_RESNETS[m]}.' for m in MODALITIES if m not in net.nets)
    backbone = net.backbone if isinstance(net, models.SolverModel) else None
    if backbone is None or backbone.quantize:
        return ()
    prefixes = [f'_vq_vae_{m}.' for m in MODALITIES] + [f'_decoder_{m}.' for m in MODALITIES]
    for m in MODALITIES:
        if m not in backbone.modalities:
            prefixes += [f'_encoder_{m}.', f'_pre_vq_conv_{m}.']
    return tuple(prefixes)


def released_names(net):
    """{project state_dict key: released state_dict key} for net."""
    pairs = _released_pairs(net)
    names = {}
    for key in net.state_dict():
        for ours, theirs in pairs:
            if key == ours or key.startswith(ours + '.'):
                names[key] = _join(theirs, key[len(ours) + 1:])
                break
        else:
            raise AssertionError(f'no released name for {key}')  # a bug in the pairs
    return names


def load_released(net, state_dict):
    """Load a state dict saved by the released code (bare model.state_dict(), its
    module names) into net, a project model built with the same config; in place.

    Raises ValueError naming the first missing or unknown key, or a key whose
    shape differs from the model's. Returns net.
    """
    names = released_names(net)
    missing = [theirs for theirs in names.values() if theirs not in state_dict]
    if missing:
        raise ValueError(f'released state dict lacks {missing[0]!r} ({len(missing)} '
                         f'missing) that {type(net).__name__} needs: built with another config?')
    wanted, unbuilt = set(names.values()), _unbuilt_prefixes(net)
    unknown = [k for k in state_dict if k not in wanted and not k.startswith(unbuilt)]
    if unknown:
        raise ValueError(f'released state dict has unknown key {unknown[0]!r} ({len(unknown)} '
                         f'unknown) for {type(net).__name__}: built with another config?')
    own = net.state_dict()
    mapped = {}
    for ours, theirs in names.items():
        value = state_dict[theirs].detach()
        if value.shape != own[ours].shape:
            raise ValueError(f'released {theirs!r} has shape {tuple(value.shape)}, '
                             f'{type(net).__name__} expects {tuple(own[ours].shape)}')
        mapped[ours] = value
    net.load_state_dict(mapped)
    return net
