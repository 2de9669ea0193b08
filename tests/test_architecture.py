"""The package's shape, read from its sources: no import cycle, methods never reach into the backend layer, the
block lifecycle lives in the runner only, internal imports inside functions only where start-up time needs them,
and no file cites documents outside the repository."""
import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"quantbench": ROOT / "quantbench", "quantbench.methods": ROOT / "methods",
           "quantbench.backends": ROOT / "backends", "quantbench.reports": ROOT / "reports"}

# internal imports made inside a function, and why (start-up time: the command line must answer without torch,
# lm-eval or matplotlib; triton must be imported after TRITON_INTERPRET is decided)
LAZY = {
    ("quantbench.cli", "quantbench.reports.leaderboard"): "lm-eval and the plugins load only for this verb",
    ("quantbench.cli", "quantbench.reports.site"): "matplotlib loads only for this verb",
    ("quantbench.cli", "quantbench.reports.regress"): "torch and the models load only for this verb",
    ("quantbench.cli", "quantbench.models"): "torch loads only for this verb",
    ("quantbench.cli", "quantbench.cache"): "torch loads only for this verb",
    ("quantbench.cli", "quantbench.cases"): "torch and the stack load only for this verb",
    ("quantbench.cli", "quantbench.reports.table"): "pandas loads only for this verb",
    ("quantbench.cli", "quantbench.api"): "torch and the stack load only for this verb (export)",
    ("quantbench.cli", "quantbench.export"): "torch loads only for this verb",
    ("quantbench", "quantbench.api"): "import quantbench stays light: the API loads torch on first use",
    ("quantbench.backends.triton_int4", "quantbench.backends.triton_kernels"): "imports triton: only when used",
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def imports(name: str, path: Path, known: set[str]):
    """(target module, at module level?) for every import of a package module in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                yield t, id(node) in top


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return {m: set(imports(m, p, set(mods))) for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (c := visit(t)):
                return c
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_import_graph_has_no_cycle(graph):
    edges = {m: {t for t, _ in ts} for m, ts in graph.items()}  # function-level imports count too
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_planted_cycle(graph):
    edges = {m: {t for t, _ in ts} for m, ts in graph.items()}
    edges["quantbench.quant"] = edges["quantbench.quant"] | {"quantbench.runner"}  # quant -> runner -> ... -> quant
    cycle = find_cycle(edges)
    assert cycle and cycle[0] == cycle[-1] and "quantbench.runner" in cycle


def test_methods_never_import_the_backend_layer(graph):
    bad = {m: sorted(t for t, _ in ts if t.startswith("quantbench.backends"))
           for m, ts in graph.items() if m.startswith("quantbench.methods")}
    assert not {m: t for m, t in bad.items() if t}


def test_internal_imports_inside_functions_only_where_start_up_needs_them(graph):
    lazy = {(m, t) for m, ts in graph.items() for t, top in ts if not top}
    assert lazy <= set(LAZY), sorted(lazy - set(LAZY))


def test_the_block_lifecycle_lives_in_the_runner_only():
    users = [str(p.relative_to(ROOT)) for p in modules().values() if "BlockCheckpoint" in p.read_text()]
    assert users == ["quantbench/layerwise.py"]
    private = [str(p.relative_to(ROOT)) for p in modules().values()
               if "_attn_implementation =" in p.read_text() or "qb_attention_plan" in p.read_text()]
    assert private == []  # attention is routed through simulate.route_attention (the public setter)


def test_no_file_cites_documents_outside_the_repository():
    try:
        files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    outside = ["../" + "shared", "design " + "§", "methods" + ".md", "kernels" + ".md", "offline-environment" + ".md"]
    hits = []
    for f in files:
        p = ROOT / f
        if p.suffix in (".py", ".md", ".ini", ".toml", ".sh", ".txt", ".cfg") and p.is_file():
            text = p.read_text(errors="replace").replace("docs/kernels" + ".md", "")  # ours, in docs/
            hits += [f"{f}: {o}" for o in outside if o in text]
    assert not hits, hits[:10]
    assert (ROOT / "docs" / "architecture.md").is_file() and "docs/architecture.md" in (ROOT / "README.md").read_text()
