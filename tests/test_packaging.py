"""The design card's folders install under the quantbench namespace, never as generic top-level packages."""
import subprocess
import sys

CODE = """
import importlib.util, quantbench.methods, quantbench.backends, quantbench.reports
from quantbench.registry import METHODS, BACKENDS
assert {'fp16', 'rtn'} <= set(METHODS) and 'fake_quant' in BACKENDS
print([importlib.util.find_spec(n) is None for n in ('methods', 'backends', 'reports', 'bench')])
"""


def test_namespaced_imports_from_outside_the_checkout(tmp_path):
    p = subprocess.run([sys.executable, "-c", CODE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[True, True, True, True]"
