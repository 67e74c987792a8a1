"""Shipped files are found in a checkout, in a wheel's package data, or where FLOWALIGN_ASSETS says."""

import glob
import os
import tomllib

from flowalign import resources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkout_paths_exist():
    assert os.path.isfile(os.path.join(resources.asset("toy-sd3"), "model_index.json"))
    assert os.path.isfile(resources.shipped_config("toy_demo.yaml"))


def test_installed_copy_and_env_override(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "_CHECKOUT", str(tmp_path))  # a wheel: no assets/ next to the package
    monkeypatch.delenv("FLOWALIGN_ASSETS", raising=False)
    assert resources.asset("toy-sd3") == os.path.join(resources._PACKAGE, "_assets", "toy-sd3")
    assert resources.shipped_config("toy_demo.yaml") == os.path.join(resources._PACKAGE, "_configs", "toy_demo.yaml")
    monkeypatch.setenv("FLOWALIGN_ASSETS", str(tmp_path / "mine"))
    assert resources.asset("tiny-clip") == str(tmp_path / "mine" / "tiny-clip")


def test_wheel_package_data_covers_every_shipped_file():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    for package, folder, shipped in (("flowalign._assets", "assets", ("toy-sd3", "tiny-clip")),
                                     ("flowalign._configs", "configs", ("",))):
        assert tool["package-dir"][package] == folder
        root = os.path.join(REPO, folder)
        covered = {os.path.normpath(p) for pat in tool["package-data"][package]
                   for p in glob.glob(os.path.join(root, pat)) if os.path.isfile(p)}
        files = {os.path.normpath(p) for s in shipped
                 for p in glob.glob(os.path.join(root, s, "**", "*"), recursive=True) if os.path.isfile(p)}
        assert files and files <= covered, sorted(files - covered)
