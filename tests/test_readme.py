"""The README's Python example runs as written, and its layout lists every module of the package."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_library_example_runs_as_written(tmp_path, monkeypatch):
    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    state, robust = scope["state"], scope["robust"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # the aggregate moved the pairs the clients trained, and the round's two clients both counted
    assert any(not torch.equal(state[k], scope["method"].init_state(scope["wrapped"]())[k]) for k in state)
    assert set(robust) == set(state)


def test_the_layout_lists_every_module():
    layout = README[README.index("## Layout"):]
    package = ROOT / "fedplora"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py" or "__pycache__" in rel.parts:
            continue
        # a module is listed by its path, or by its name inside its listed folder's line
        if str(rel) not in layout and f"{path.stem}.py" not in layout and f"{path.stem}/" not in layout:
            missing.append(str(rel))
    assert not missing, f"README's layout omits {missing}"
