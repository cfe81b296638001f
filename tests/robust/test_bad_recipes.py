"""Bad recipes fail cleanly: every file in ``corpus/recipes/`` is refused by ``edgekit validate`` and ``edgekit run``.

Each corpus file says on its first line what is wrong with it and on its second line
(``# expect: a | b | c``) the fragments the error must contain: the key or file it names and
the fix. ``edgekit validate`` lists every problem (one line each, exit 2); ``edgekit run``
refuses before doing any work: one ``edgekit: error:`` line, exit 2, no traceback, the recipe
(and the device profiles and bases it uses) unchanged, and nothing in the artifact store.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.cli import main
from tests.robust.clean import assert_clean_failure, snapshot

CORPUS = Path(__file__).parent / "corpus" / "recipes"
CASES = sorted(CORPUS.glob("*.yaml"))


def expected(path: Path) -> list[str]:
    """The fragments named on the file's ``# expect:`` line."""
    for line in path.read_bytes().decode("ascii", "replace").splitlines()[:3]:
        if line.startswith("# expect:"):
            return [f.strip() for f in line.removeprefix("# expect:").split("|") if f.strip()]
    raise AssertionError(f"{path} has no '# expect:' line")


def test_corpus_is_complete():
    assert len(CASES) >= 40
    for path in CASES:
        assert path.read_bytes().startswith(b"# "), f"{path.name}: the first line must say what is wrong"
        assert expected(path)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_validate_lists_the_problem_naming_file_key_and_fix(capsys, home, path):
    before = snapshot(CORPUS)
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    assert "Traceback" not in out + err
    header, *problems = [line for line in out.splitlines() if line.strip()]
    assert header.startswith(f"{path}: ") and "problem(s)" in header, out
    assert problems and all(p.startswith("  - ") for p in problems), f"a problem spans several lines: {out!r}"
    for fragment in expected(path):
        assert any(fragment in p for p in problems), f"{fragment!r} not in {out!r}"
    assert snapshot(CORPUS) == before
    assert not (home / "artifacts").exists()


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_run_refuses_before_any_work(capsys, home, path):
    line = assert_clean_failure(capsys, ["run", path], [str(path.name), *expected(path)], watch=[CORPUS], home=home)
    assert "cannot run" in line
    assert not (home / "artifacts").exists() and not (home / "runs").exists()


def test_device_profile_paths_are_relative_to_the_recipe_not_the_cwd(capsys, home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # profiles/bad-units.yaml does not exist here, only beside the recipe
    path = CORPUS / "device-profile-bad-units.yaml"
    assert_clean_failure(capsys, ["run", path], [str(CORPUS / "profiles" / "bad-units.yaml"), "'512 parsecs'"],
                         watch=[CORPUS], home=home)


@pytest.mark.parametrize("argv, fragments", [
    (["run", "{tmp}/no-such-recipe.yaml"], ["no-such-recipe.yaml does not exist", "check the path"]),
    (["run", "{tmp}"], ["is a folder, not a YAML file", "pass a recipe file"]),
    (["validate", "{tmp}/no-such-recipe.yaml"], None),
])
def test_a_recipe_path_that_is_not_a_file(capsys, home, tmp_path, argv, fragments):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "other.yaml").write_text("device: pi-5-8gb\n")
    argv = [a.format(tmp=folder) for a in argv]
    if fragments is not None:
        assert_clean_failure(capsys, argv, fragments, watch=[folder], home=home)
        return
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and "does not exist" in out and "Traceback" not in out + err
