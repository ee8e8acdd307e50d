"""OGM-GE's CREMA-D lists (lists/ogm-ge/) and read_cremad.py --split_by=ogm-ge."""
import json
import pickle
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

import datasets
import read_cremad
from cmvq import cremad
from cmvq.errors import BadValueError, MissingError

SPLITS = ('train', 'val', 'test')
FAULTY = set(cremad.FAULTY)


@pytest.fixture(scope='module')
def listing(shared):
    """Real CREMA-D's clip names and demographics (no media needed to plan)."""
    names = list(pd.read_csv(shared / 'crema-d' / 'SentenceFilenames.csv').Filename)
    return names, cremad.read_demographics(shared / 'crema-d')


@pytest.fixture(scope='module')
def lists():
    return {s: set(v) for s, v in cremad.read_ogm_ge().items()}


def emotions(names):
    return Counter(n.split('_')[2] for n in names)


def write_lists(folder, train, test):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (('train', train), ('test', test)):
        (folder / f'{split}.csv').write_text(''.join(f'{r}\n' for r in rows))
    return folder


# ----------------------------------------------------------------------------- the lists

def test_shipped_lists_are_the_published_files(shared):
    published = shared / 'ogm-ge-split'
    for ours, theirs in (('train.csv', 'train.csv'), ('test.csv', 'test.csv'),
                         ('LICENSE', 'LICENSE-OGM-GE.txt')):
        assert (cremad.OGM_GE_LISTS / ours).read_bytes() == (published / theirs).read_bytes()
    assert 'MIT License' in (cremad.OGM_GE_LISTS / 'LICENSE').read_text()
    assert 'GeWu-Lab/OGM-GE_CVPR2022' in (cremad.OGM_GE_LISTS / 'README.md').read_text()


def test_lists_cover_every_clip_once(listing, lists):
    names, _ = listing
    assert [len(lists[s]) for s in ('train', 'test')] == [6698, 744]
    assert not lists['train'] & lists['test']
    assert lists['train'] | lists['test'] == set(names)


@pytest.mark.parametrize('row, message', [
    ('1001_DFA_ANG_XX,SAD', 'row 2: clip 1001_DFA_ANG_XX is labelled'),
    ('1001_DFA_ANG_XX', 'row 2: .* is not `clip name,emotion`'),
    ('1001_XYZ_ANG_XX,ANG', "'1001_XYZ_ANG_XX' is not a CREMA-D clip name"),
    ('1001_DFA_SAD_XX,SAD', 'listed twice')])
def test_a_bad_row_is_named(tmp_path, row, message):
    folder = write_lists(tmp_path, ['1001_DFA_SAD_XX,SAD', row], ['1002_DFA_ANG_XX,ANG'])
    with pytest.raises(BadValueError, match=message) as error:
        cremad.read_ogm_ge(folder)
    assert 'train.csv' in str(error.value)


def test_a_clip_in_both_lists_or_a_missing_list_is_refused(tmp_path):
    folder = write_lists(tmp_path, ['1001_DFA_SAD_XX,SAD'], ['1001_DFA_SAD_XX,SAD'])
    with pytest.raises(BadValueError, match='1 clips are in both lists'):
        cremad.read_ogm_ge(folder)
    (folder / 'test.csv').unlink()
    with pytest.raises(MissingError, match='test.csv is missing'):
        cremad.read_ogm_ge(folder)


# ----------------------------------------------------------------------------- planning

def test_full_listing_holds_the_lists_exactly(listing, lists):
    names, demographics = listing
    kept, _ = cremad.plan_splits(names, demographics, split_by='ogm-ge')
    assert [len(kept[s]) for s in SPLITS] == [5954, 744, 744]
    assert set(kept['test']) == lists['test']
    assert set(kept['train']) | set(kept['val']) == lists['train']
    assert not set(kept['train']) & set(kept['val'])
    # val: each emotion in its share of the train list, to the clip
    share = emotions(lists['train'])
    for emotion, count in emotions(kept['val']).items():
        assert abs(count - 744 * share[emotion] / 6698) < 1, emotion
    # faulty clips (all four in the train list) go after splitting, as in the other splits
    splits, dropped = cremad.plan_splits(names, demographics, split_by='ogm-ge',
                                         drop=FAULTY)
    assert sorted(dropped) == sorted(FAULTY)
    assert {s: [n for n in kept[s] if n not in FAULTY] for s in SPLITS} == splits


def test_validation_is_seeded_and_test_is_fixed(listing):
    names, demographics = listing
    plans = [cremad.plan_splits(names, demographics, seed=s, split_by='ogm-ge')[0]
             for s in (0, 0, 1)]
    assert plans[0] == plans[1]
    assert plans[0]['val'] != plans[2]['val']
    assert plans[0]['test'] == plans[2]['test']


def test_a_few_actors_keep_their_part_of_each_list(listing, lists):
    names, demographics = listing
    few = [n for n in names if n[:4] in ('1001', '1002', '1003', '1004')]
    splits, _ = cremad.plan_splits(few, demographics, split_by='ogm-ge')
    presence = cremad.ogm_ge_presence(few)
    assert presence['train'] == {'listed': 6698, 'present': len(lists['train'] & set(few))}
    assert presence['test'] == {'listed': 744, 'present': len(lists['test'] & set(few))}
    assert presence['in_neither'] == []
    assert set(splits['test']) == lists['test'] & set(few)
    pool = presence['train']['present']
    assert len(splits['val']) == round(pool * 744 / 6698)
    assert len(splits['train']) + len(splits['val']) == pool


def test_no_clip_of_the_test_list_is_an_error(listing, lists):
    _, demographics = listing
    train_only = sorted(lists['train'])[:40]
    with pytest.raises(MissingError, match='none of the 744 clips of .*test.csv'):
        cremad.plan_splits(train_only, demographics, split_by='ogm-ge')


# ----------------------------------------------------------------------------- the builder

def test_read_cremad_builds_the_split_of_a_twin(twin, tmp_path, lists, capsys):
    out = tmp_path / 'data'
    record = read_cremad.main([f'--root={twin}', f'--data_path={out}', '--split_by=ogm-ge',
                               '--cache=False', '--workers=1', '--progress=False'])
    names = {s: [Path(p).stem for p in pickle.loads((out / f'{s}_videos.pkl').read_bytes())]
             for s in SPLITS}
    tree = set(cremad.read_names(twin))
    assert set(names['test']) == lists['test'] & tree
    assert set(names['train']) | set(names['val']) == lists['train'] & tree
    assert all(names.values()) and not set(names['train']) & set(names['val'])
    saved = json.loads((out / 'split.json').read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved['split_by'] == 'ogm-ge' and saved['lists']['source'] == 'lists/ogm-ge'
    present = saved['lists']['test']['present']
    assert present == len(names['test'])
    printed = capsys.readouterr().out
    assert f'lists/ogm-ge/test.csv: {present} of its 744 clips listed in the tree' in printed
    assert '(ogm-ge split, seed 0)' in printed


def test_the_released_split_tests_on_other_clips(shared, lists):
    paths, _ = datasets.load_split(shared / 'cm-vqvae-split', 'test')
    released = {datasets.clip_name(p) for p in paths}
    assert len(released) == 744 and len(released & lists['test']) == 81
