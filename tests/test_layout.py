"""The rules of the house (docs/layout.md): the card's scripts on top, one library beneath,
tools in named folders; no script imports a script, no import cycle, no module over 900
lines, model.py imports no project file."""
import ast

from conftest import REPO

LIBRARIES = {'model', 'model_feat', 'datasets', 'read_variances'}  # top-level files others import
SCRIPT_EXCEPTIONS = {'main'}  # main.header() / main.main(argv), by DESIGN
MAX_LINES = 900


def modules():
    """{dotted module name: path} of every project Python file outside tests/."""
    files = [p for p in REPO.rglob('*.py') if 'tests' not in p.relative_to(REPO).parts]
    return {'.'.join(p.relative_to(REPO).with_suffix('').parts).removesuffix('.__init__'): p
            for p in files}


def imports(path, known):
    """Project modules imported by the file at path (at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph():
    mods = modules()
    return {name: imports(path, mods) for name, path in mods.items()}


def is_script(name):
    """A runnable: a top-level file that is not a library, or a prepare/ or tools/ module."""
    top = (REPO / f'{name}.py').is_file() and name not in LIBRARIES
    return top or name.split('.')[0] in ('prepare', 'tools') and '.' in name


def test_top_level_holds_at_most_twelve_scripts():
    top = sorted(p.name for p in REPO.glob('*.py'))
    assert len(top) <= 12, top
    assert {'main.py', 'main_separate.py', 'model.py', 'datasets.py', 'read_cremad.py',
            'read_variances.py'} <= set(top)


def test_no_script_imports_a_script_and_the_library_imports_none():
    for name, targets in graph().items():
        scripts = {t for t in targets if is_script(t) and t not in SCRIPT_EXCEPTIONS}
        assert not scripts, f'{name} imports the script(s) {sorted(scripts)}'
        if name.startswith('cmvq') or name in LIBRARIES:
            assert not {t for t in targets if is_script(t)}, f'{name} imports a script'


def test_model_imports_no_project_file():
    assert graph()['model'] == set()


def test_no_import_cycle():
    edges = graph()
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for target in edges.get(node, ()):
            if state.get(target) == 'open':
                raise AssertionError(f'import cycle: {" -> ".join(path + [node, target])}')
            if target not in state:
                visit(target, path + [node])
        state[node] = 'done'
    for node in edges:
        if node not in state:
            visit(node, [])


def test_no_module_over_900_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
