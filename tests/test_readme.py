"""The README is the front page: short, and every Python snippet in it runs as written (in order, in one
namespace, from an empty folder, as a reader pasting them would)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _python_blocks(path: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", open(path, encoding="utf-8").read(), flags=re.S)


def test_readme_is_short():
    assert os.path.getsize(README) <= 10 * 1024  # measured tables live in docs/results.md


def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    blocks = _python_blocks(README)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # not the repository root: shipped files resolve through flowalign.asset
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    assert float(namespace["ratio"].sub(1).abs().max()) < 1e-4  # the on-policy ratio the README promises
    assert os.path.isfile(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors")
    assert namespace["summary"]["iterations"] == 1


def _docs_pages() -> list[str]:
    """Every .md file under docs/ (also in subfolders such as docs/algorithms/), relative to the repository."""
    pages = []
    for dirpath, _, filenames in os.walk(os.path.join(ROOT, "docs")):
        pages += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames if f.endswith(".md")]
    return sorted(pages)


def test_docs_python_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "docs/algorithms/grpo.md" in _docs_pages()
    for page in _docs_pages():
        for i, code in enumerate(_python_blocks(os.path.join(ROOT, page))):
            exec(compile(code, f"{page} python block {i + 1}", "exec"), {})


def test_docs_links_point_at_files():
    # relative links between the pages (and to code) must resolve; anchors and web links are not checked
    for page in ["README.md", *_docs_pages()]:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))
            assert os.path.exists(path), f"{page} links to {target}, which does not exist"


def test_license_matches_pyproject():
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert 'license = { text = "Apache-2.0" }' in text
    assert open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").readline().strip() == "Apache License"


def test_public_api_names_resolve_after_every_submodule_is_imported():
    # a name of flowalign's API that is also a submodule's would be replaced by the module once imported
    import importlib
    import pkgutil

    import flowalign

    for info in pkgutil.iter_modules(flowalign.__path__):
        importlib.import_module(f"flowalign.{info.name}")
    for name, (module, attribute) in flowalign._API.items():
        expected = importlib.import_module(module)
        assert getattr(flowalign, name) is (expected if attribute is None else getattr(expected, attribute)), name
