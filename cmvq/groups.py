"""Test metrics per speaker group: gender, race, age group, actor; and human reference rates.

Group labels come from the split config (datasets.LABEL_NAMES: the clip's actor
and VideoDemographics.csv's age, sex and race). Where the clips sit in a real
CREMA-D checkout, the human raters' recognition of the same clips is reported
beside the model's as a reference, from the checkout's summaryTable.csv
(processedResults/summaryTable.csv in the released tree).
"""
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

import datasets

# group name -> (label column of datasets.LABEL_NAMES, value names)
GROUPS = {'gender': (datasets.GENDER, datasets.GENDERS),
          'race': (datasets.RACE, datasets.RACES),
          'age': (datasets.AGE, datasets.AGES),
          'actor': (datasets.ACTOR, None)}  # actor: the CREMA-D ID, 1001..
NUM_CLASSES = len(datasets.EMOTIONS)
SUMMARY_TABLES = ('processedResults/summaryTable.csv', 'summaryTable.csv')
SYNTH_MARKER = '.synth_cremad.json'  # synth_cremad.MARKER: a twin, not real clips
# summaryTable.csv's majority-vote columns (letters A D F H N S; a tie reads 'N:S')
HUMAN_COLUMNS = {'audio': 'VoiceVote', 'video': 'FaceVote', 'audio-visual': 'MultiModalVote'}


def group_metrics(preds, targets, labels, paths, num_classes=NUM_CLASSES):
    """Accuracy and count per value of each group, the confusion matrix per gender,
    and (real CREMA-D clips only) the human rates of the same clips.

    preds, targets: (N,) in the order of the split; labels: (N, 8) of the split.
    """
    correct = np.asarray(preds) == np.asarray(targets)
    out = {}
    for group, (column, names) in GROUPS.items():
        values = labels[:, column]
        out[group] = {_value_name(v, names): {'accuracy': float(correct[values == v].mean()),
                                              'n': int((values == v).sum())}
                      for v in np.unique(values)}
    genders = labels[:, datasets.GENDER]
    out['confusion_by_gender'] = {
        datasets.GENDERS[g]: confusion_matrix(np.asarray(targets)[genders == g],
                                              np.asarray(preds)[genders == g],
                                              labels=list(range(num_classes))).tolist()
        for g in np.unique(genders)}
    human = human_rates(paths)
    if human:
        out['human'] = human
    return out


def _value_name(value, names):
    return names[value] if names else str(int(value) + datasets.FIRST_ACTOR)


def find_summary_table(paths):
    """summaryTable.csv of the real CREMA-D checkout holding these clips, or None."""
    if not paths:
        return None
    root = Path(paths[0]).parent.parent  # root/VideoFlash/NAME.flv
    if (root / SYNTH_MARKER).exists():
        return None
    return next((root / t for t in SUMMARY_TABLES if (root / t).is_file()), None)


def human_rates(paths, table=None):
    """Share of the clips whose human majority vote is the intended emotion, per
    modality rated (audio, video, audio-visual); a tie that includes the intended
    emotion counts 1/k for k tied votes. None without a table (a twin, or a
    checkout without summaryTable.csv). Clips missing from the table are skipped.
    """
    table = table or find_summary_table(paths)
    if table is None:
        return None
    votes = pd.read_csv(table).set_index('FileName')
    names = [Path(p).stem for p in paths]
    known = [n for n in names if n in votes.index]
    if not known:
        return None
    intended = [n.split('_')[2][0] for n in known]  # 'ANG' -> 'A', the summary's letters
    rates = {'n': len(known), 'table': str(table)}
    for modality, column in HUMAN_COLUMNS.items():
        credit = [_vote_credit(v, e) for v, e in zip(votes.loc[known, column], intended,
                                                     strict=True)]
        rates[modality] = float(np.mean(credit))
    return rates


def _vote_credit(vote, intended):
    tied = str(vote).split(':')
    return 1 / len(tied) if intended in tied else 0.0


def group_lines(groups):
    """Log lines: accuracy (n) per group value, the per-gender confusion, human rates."""
    lines = []
    for group in GROUPS:
        lines.append(f'  by {group}: ' + ', '.join(
            f'{name} {100 * g["accuracy"]:.1f}% ({g["n"]})' for name, g in groups[group].items()))
    for gender, cm in groups['confusion_by_gender'].items():
        lines.append(f'  confusion {gender}: ' + ' | '.join(
            ' '.join(f'{n:3d}' for n in row) for row in cm))
    human = groups.get('human')
    if human:
        lines.append(f'  human raters on these {human["n"]} clips (majority vote = intended '
                     'emotion): ' + ', '.join(f'{m} {100 * human[m]:.1f}%'
                                              for m in HUMAN_COLUMNS))
    return lines
