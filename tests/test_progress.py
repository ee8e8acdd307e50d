"""Progress off a terminal (a redirected log): plain lines, no carriage returns."""
from cmvq.progress import PlainProgress, progress_bar


def test_a_redirected_job_prints_one_line_at_its_end(capsys):
    assert list(progress_bar(range(25), desc='decode', unit='clip')) == list(range(25))
    assert capsys.readouterr().err == 'decode: 25/25 clip (0 s)\n'


def test_lines_on_the_way_come_at_tenths_and_at_most_every_ten_seconds(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr('cmvq.progress.time.time', lambda: now[0])
    bar = progress_bar(total=20, desc='render', unit='clip')
    for _ in range(20):
        now[0] += 3.0  # 3 s a clip: a tenth (2 clips) every 6 s, a line every 12 s
        bar.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ['render: 4/20 clip (12 s)', 'render: 8/20 clip (24 s)',
                     'render: 12/20 clip (36 s)', 'render: 16/20 clip (48 s)',
                     'render: 20/20 clip (60 s)']


def test_per_batch_bars_print_nothing_off_a_terminal(capsys):
    bar = progress_bar(range(5), desc='epoch 1 train', lines=False)
    assert isinstance(bar, PlainProgress) and list(bar) == list(range(5))
    assert capsys.readouterr().err == ''
