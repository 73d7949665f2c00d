"""The import rule (docs/architecture.md): commands sit above the library; no library module imports a command,
no command imports another, and no two modules import each other."""
import ast
import glob
import os

from conftest import ROOT

# The root holds the commands and the design card's library modules: every other root module is a command.
CARD_LIBRARY = {"data_utils", "model_utils", "augment", "presets"}
COMMANDS = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))} - CARD_LIBRARY


def module_files():
    """{module name: path} of every module of the kit: the root's and kit/'s (names are unique)."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "kit", "**", "*.py"), recursive=True)
    return {os.path.splitext(os.path.basename(p))[0]: p for p in paths if not p.endswith("__init__.py")}


def imports():
    """{module: the kit's modules it imports} (import x, from kit.group import x, from kit.group.x import y)."""
    files = module_files()
    found = {}
    for name, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[-1] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                parts = node.module.split(".")
                names |= {alias.name for alias in node.names} if parts[0] == "kit" and len(parts) == 2 else \
                    {parts[-1]}
        found[name] = (names & set(files)) - {name}
    return found


def test_commands_sit_above_the_library_and_nothing_imports_in_a_circle():
    found = imports()
    assert {"train_caltech101", "serve", "bench"} <= COMMANDS <= set(found)
    assert {"training", "splits", "errors", "archs"} <= set(found)
    assert all(found[m] for m in ("training", "splits")), "imports of kit modules were not seen"
    upward = sorted(f"{m} imports {c}" for m, deps in found.items() for c in deps & COMMANDS)
    assert not upward, "a module imports a command (move what it needs into the library)"
    pairs = sorted(f"{a} <-> {b}" for a, deps in found.items() for b in deps if a < b and a in found.get(b, ()))
    assert not pairs


def test_every_error_has_one_spelling():
    """The kit's errors live in errors.py and are raised as errors.X everywhere: no module re-binds one under its
    own name (presets.ConfigError, splits.DataError, ...) or imports one bare."""
    aliases = []
    for path in module_files().values():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and \
                    isinstance(node.value.value, ast.Name) and node.value.value.id == "errors":
                aliases.append(f"{os.path.basename(path)}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module and \
                    any(alias.name.endswith("Error") for alias in node.names):
                aliases.append(f"{os.path.basename(path)}: {ast.unparse(node)}")
    assert not aliases


def test_every_command_enters_through_the_one_wrapper():
    """Each command's cli() goes through errors.run_cli (one-line errors, Ctrl-C handling) and sits behind
    `if __name__ == "__main__":`."""
    for name in sorted(COMMANDS):
        with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as f:
            text = f.read()
        assert "errors.run_cli(" in text and 'if __name__ == "__main__":\n    sys.exit(cli())' in text, name
