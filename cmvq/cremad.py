"""CREMA-D split configs: from a CREMA-D tree (or its twin) to a split config folder.

The clip list is the tree's SentenceFilenames.csv, the speakers' facts its
VideoDemographics.csv. Clips are split first (so the published sizes 5954 / 744 /
744 of all 7,442 names hold for any seed) and then the faulty clips and clips with
no FLV are dropped from both paths and labels. Three splits: random by clip (the
released code's), by actor, or OGM-GE's published lists (lists/ogm-ge/) with a
validation sample of their training list. read_cremad.py is the command;
main.py's demo (twin_actors > 0) and tools/bench.py make a twin and its splits
with prepare_twin.
"""
import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

import datasets
from cmvq import atomic
from cmvq.cache import DEFAULT_WORKERS
from cmvq.errors import BadValueError, ExistsError, MissingError
from cmvq.splits import (PAPER_SIZES, SPLITS, check_usable, format_counts, split_counts,
                         validate_splits, write_split_folder)

# Clips of CREMA-D that cannot be used (the released code's list).
FAULTY = ('1064_TIE_SAD_XX', '1064_IEO_DIS_MD', '1076_MTI_NEU_XX', '1076_MTI_SAD_XX')
# OGM-GE's published lists, shipped in the checkout: {split: file} (no validation list).
OGM_GE_SOURCE = 'lists/ogm-ge'  # relative to the checkout, as split.json names it
OGM_GE_LISTS = Path(__file__).resolve().parents[1] / OGM_GE_SOURCE
OGM_GE_FILES = {'train': 'train.csv', 'test': 'test.csv'}


def read_names(root):
    """Clip names listed in root/SentenceFilenames.csv, in file order."""
    return list(_read_csv(Path(root) / 'SentenceFilenames.csv', 'Filename')['Filename'])


def read_demographics(path):
    """VideoDemographics.csv (or the folder holding it) -> {actor ID: row dict}."""
    path = Path(path)
    if path.is_dir():
        path = path / 'VideoDemographics.csv'
    table = _read_csv(path, 'ActorID', 'Age', 'Sex', 'Race', 'Ethnicity')
    return {int(row['ActorID']): row for row in table.to_dict('records')}


def _read_csv(path, *columns):
    """A CREMA-D CSV as a DataFrame; a missing file or column is a UserError naming it."""
    if not path.is_file():
        where = path.parent
        hint = ('it does not exist' if not where.exists() else
                'it is empty' if where.is_dir() and not any(where.iterdir()) else
                f'it holds no {path.name}')
        raise MissingError(f'{path} is missing: root={str(where)!r} must be a CREMA-D checkout '
                           f'({hint}); give --root=DIR or make a twin with synth_cremad.py')
    table = pd.read_csv(path)
    lacking = [c for c in columns if c not in table.columns]
    if lacking:
        raise BadValueError(f'{path} has no column {", ".join(map(repr, lacking))}; '
                            f'expected the CREMA-D columns {", ".join(map(repr, columns))}')
    return table


def clip_labels(name, demographics):
    """The 8 int labels of datasets.LABEL_NAMES for clip ``name``."""
    actor, sentence, emotion, level = datasets.parse_name(name)
    person = demographics.get(actor + datasets.FIRST_ACTOR)
    if person is None:
        raise BadValueError(f'actor of {name} is not in VideoDemographics.csv')
    age = min(max(int(person['Age']) // 10 - 2, 0), len(datasets.AGES) - 1)
    return [actor, sentence, emotion, level, age, datasets.GENDERS.index(person['Sex']),
            datasets.RACES.index(person['Race']), datasets.ETHNICITIES.index(person['Ethnicity'])]


def encode_labels(names, demographics):
    """Names -> the 8 aligned label lists."""
    rows = [clip_labels(n, demographics) for n in names]
    return [[row[k] for row in rows] for k in range(len(datasets.LABEL_NAMES))]



def plan_splits(names, demographics, *, seed=0, split_by='clip', sizes=PAPER_SIZES,
                drop=(), lists=OGM_GE_LISTS):
    """Assign clip names to splits; a pure function of its arguments (and of the
    list files for 'ogm-ge').

    Returns ({split: names}, dropped), dropped = the names of ``drop`` that were
    listed, removed after splitting. split_by='clip' splits the shuffled names in
    the proportions of ``sizes``; 'actor' splits the shuffled actors in those
    proportions (each split at least one actor), so no actor is in two splits and
    the clip counts are approximate; 'ogm-ge' takes OGM-GE's lists (ogm_ge_parts).
    """
    names = sorted(set(names))
    unknown = sorted({n.split('_')[0] for n in names} - {str(a) for a in demographics})
    if unknown:
        raise BadValueError(f'actors {", ".join(unknown)} are not in VideoDemographics.csv')
    rng = np.random.default_rng(seed)
    if split_by == 'ogm-ge':
        parts = ogm_ge_parts(names, rng, sizes, lists)
    elif split_by == 'clip':
        order = [names[i] for i in rng.permutation(len(names))]
        bounds = np.cumsum(split_counts(len(order), sizes))
        parts = np.split(np.array(order, dtype=object), bounds[:-1])
    elif split_by == 'actor':
        order = [names[i] for i in rng.permutation(len(names))]
        actors = sorted({n.split('_')[0] for n in names})
        if len(actors) < 3:
            raise BadValueError(f"split_by='actor' needs >= 3 actors, got {len(actors)}; "
                                "use split_by='clip'")
        actors = [actors[i] for i in rng.permutation(len(actors))]
        bounds = np.cumsum(split_counts(len(actors), sizes))
        owner = {a: k for k, group in enumerate(np.split(np.array(actors), bounds[:-1]))
                 for a in group}
        parts = [[n for n in order if owner[n.split('_')[0]] == k] for k in range(3)]
    else:
        raise BadValueError(f"split_by={split_by!r} is not 'clip', 'actor' or 'ogm-ge'")
    drop = set(drop)
    splits = {s: [n for n in part if n not in drop] for s, part in zip(SPLITS, parts, strict=True)}
    return splits, sorted(drop.intersection(names))


# ----------------------------------------------------------------------------- OGM-GE's lists

def read_clip_list(path):
    """A list file of OGM-GE's format (no header; rows `clip name,emotion`) -> the names in
    file order. A malformed row, a name listed twice or an emotion that is not the name's
    is a BadValueError naming the file and row."""
    if not path.is_file():
        raise MissingError(f'{path} is missing: the project ships it in {path.parent}; '
                           'restore it from the checkout')
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    names = []
    for number, row in enumerate(rows, 1):
        where = f'{path}, row {number}'
        if len(row) != 2:
            raise BadValueError(f'{where}: {row!r} is not `clip name,emotion`')
        try:
            datasets.parse_name(row[0])
        except BadValueError as e:
            raise BadValueError(f'{where}: {e}') from None
        if row[0].split('_')[2] != row[1]:
            raise BadValueError(f'{where}: clip {row[0]} is labelled {row[1]!r}, '
                                'not its own emotion')
        names.append(row[0])
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise BadValueError(f'{path}: {len(twice)} clips are listed twice (e.g. {twice[0]})')
    return names


def read_ogm_ge(lists=OGM_GE_LISTS):
    """OGM-GE's lists -> {'train': names, 'test': names}; a clip in both is a BadValueError."""
    listed = {s: read_clip_list(Path(lists) / f) for s, f in OGM_GE_FILES.items()}
    both = sorted(set(listed['train']) & set(listed['test']))
    if both:
        raise BadValueError(f'{lists}: {len(both)} clips are in both lists (e.g. {both[0]})')
    return listed


def ogm_ge_parts(names, rng, sizes=PAPER_SIZES, lists=OGM_GE_LISTS):
    """[train, val, test] of ``names`` (sorted) by OGM-GE's lists: test = the names of
    their test list; val = an emotion-stratified sample of the names of their train list,
    sizes[1] of every sizes[0] + sizes[1] (744 of the 6,698); train = the rest. Names in
    neither list are left out (ogm_ge_presence counts them)."""
    listed = {s: set(v) for s, v in read_ogm_ge(lists).items()}
    test = [n for n in names if n in listed['test']]
    if not test:
        raise MissingError(f'none of the {len(listed["test"])} clips of {lists}/test.csv is '
                           'listed in SentenceFilenames.csv; give a CREMA-D checkout, or a '
                           "twin of real clip names (e.g. prepare.synth_cremad --like=...)")
    pool = [n for n in names if n in listed['train']]
    count = min(max(round(len(pool) * sizes[1] / (sizes[0] + sizes[1])), 1), len(pool) - 1)
    val = stratified_sample(pool, count, rng)
    chosen = set(val)
    return [n for n in pool if n not in chosen], val, test


def stratified_sample(names, count, rng):
    """``count`` of ``names`` drawn without replacement, each emotion in proportion to its
    share (its quota rounded by largest remainder), in the order of names."""
    emotions = np.array([n.split('_')[2] for n in names])
    classes, sizes = np.unique(emotions, return_counts=True)
    exact = count * sizes / len(names)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact, kind='stable')[:count - quota.sum()]] += 1
    chosen = set()
    for emotion, k in zip(classes, quota, strict=True):
        members = [n for n, e in zip(names, emotions, strict=True) if e == emotion]
        chosen.update(members[i] for i in rng.choice(len(members), k, replace=False))
    return [n for n in names if n in chosen]


def describe_lists(record):
    """The lines read_cremad.py prints about the lists of an 'ogm-ge' split.json record."""
    lists = record.get('lists')
    if not lists:
        return []
    lines = [f'{lists["source"]}/{OGM_GE_FILES[s]}: {lists[s]["present"]} of its '
             f'{lists[s]["listed"]} clips listed in the tree' for s in OGM_GE_FILES]
    left = lists['in_neither']
    if left:
        lines.append(f'left out {len(left)} clip(s) of the tree in neither list: '
                     f'{", ".join(left[:5])}{", ..." if len(left) > 5 else ""}')
    return lines


def ogm_ge_presence(names, lists=OGM_GE_LISTS):
    """How much of OGM-GE's lists the clip names of a tree hold (a twin of a few actors
    holds a part): {list: {'listed', 'present'}} and 'in_neither' (names of no list)."""
    listed = read_ogm_ge(lists)
    names = set(names)
    record = {s: {'listed': len(v), 'present': len(names.intersection(v))}
              for s, v in listed.items()}
    record['in_neither'] = sorted(names.difference(*listed.values()))
    return record


def format_stats(labels, split):
    """Class counts per label, in the published {split}_stats.txt format."""
    classes = {'actor': None, 'sentence': datasets.SENTENCES, 'emo': datasets.EMOTIONS,
               'level': datasets.LEVELS, 'age': datasets.AGES, 'gender': datasets.GENDERS,
               'race': datasets.RACES, 'ethnic': datasets.ETHNICITIES}
    return format_counts(dict(zip(datasets.LABEL_NAMES, labels, strict=True)), classes, split)




def build_splits(root, data_path, *, seed=0, split_by='clip', sizes=PAPER_SIZES, faulty=FAULTY,
                 overwrite=False, workers=DEFAULT_WORKERS, cache=True, cache_dir='cache',
                 frame_jitter=datasets.CREMAD_JITTER, backend='pyav', progress=True):
    """Write the split configs of the CREMA-D tree ``root`` into ``data_path``.

    Refuses (ExistsError, a FileExistsError) to write into a non-empty data_path
    unless overwrite, and (MissingError) a root without the CSVs or without any
    listed FLV. Returns the split.json record.
    """
    out = Path(data_path)
    atomic.remove_stale_temps(out.parent, out.name)
    if out.exists() and not out.is_dir():
        raise ExistsError(f'data_path={str(out)!r} is a file; choose a folder for --data_path')
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExistsError(f'data_path={str(out)!r} already exists and is not empty; pass '
                          '--overwrite=True to replace its files, or choose another --data_path')
    root = os.path.normpath(root)
    names = read_names(root)
    missing = sorted(n for n in set(names) if not _flv(root, n).is_file())
    if names and len(missing) == len(set(names)):
        raise MissingError(f'none of the {len(set(names))} clips listed in {root}/'
                           f'SentenceFilenames.csv has an FLV in {root}/VideoFlash; fetch the '
                           'media (git lfs pull) or give the right --root')
    demographics = read_demographics(root)
    splits, dropped = plan_splits(names, demographics, seed=seed, split_by=split_by,
                                  sizes=sizes, drop=set(faulty) | set(missing))
    paths = {s: [str(_flv(root, n)) for n in splits[s]] for s in SPLITS}
    check_usable(root, paths, None, len(set(names)), len(missing), 0)
    paths, bad, (image_var, audio_var) = validate_splits(
        paths, cache=cache, cache_dir=cache_dir, frame_jitter=frame_jitter,
        backend=backend, workers=workers, progress=progress)
    bad = {Path(p).stem: reason for p, reason in bad.items()}
    splits = {s: [n for n in splits[s] if n not in bad] for s in SPLITS}
    check_usable(root, paths, (image_var, audio_var), len(set(names)), len(missing), len(bad))
    record = {'seed': seed, 'split_by': split_by, 'requested_sizes': list(sizes),
              'sizes': {s: len(paths[s]) for s in SPLITS}, 'root': root,
              'root_abs': os.path.abspath(root), 'listed': len(set(names)),
              'dropped': {'faulty': [n for n in dropped if n in set(faulty)],
                          'missing': [n for n in dropped if n not in set(faulty)],
                          'bad': dict(sorted(bad.items()))},
              'image_var': image_var, 'audio_var': audio_var}
    if split_by == 'ogm-ge':
        record['lists'] = {'source': OGM_GE_SOURCE, **ogm_ge_presence(names)}
    labels = {s: encode_labels(splits[s], demographics) for s in SPLITS}
    write_split_folder(out, {s: (paths[s], labels[s], format_stats(labels[s], s))
                             for s in SPLITS},
                       (image_var, audio_var), record, overwrite=overwrite)
    return record




def prepare_twin(twin_root, data_path, *, seed=0, workers=DEFAULT_WORKERS, cache_dir='cache',
                 frame_jitter=datasets.CREMAD_JITTER, progress=True, **options):
    """Split configs of a synthetic twin at twin_root, both made if missing (the demo's
    and the benchmark's data). options: cmvq.twins.cremad.generate's other keywords
    (num_actors, like, duration_scale, ...)."""
    if (Path(data_path) / 'train_videos.pkl').is_file():
        return
    print(f'{data_path} is missing: making a synthetic twin at {twin_root} and its splits')
    # here, not on top: the renderer's imports (scipy.signal, scikit-learn) cost every
    # demo run a second, and a run whose data exist never renders
    from cmvq.twins import cremad as twin
    twin.generate(root=twin_root, seed=seed, workers=workers, progress=progress, **options)
    build_splits(twin_root, data_path, seed=seed, workers=workers, cache_dir=cache_dir,
                 frame_jitter=frame_jitter, progress=progress)


def _flv(root, name):
    return Path(root) / 'VideoFlash' / f'{name}.flv'
