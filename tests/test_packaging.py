"""What pyproject.toml declares: the license, the test extra, dependencies every platform can
install; and CI runs the README's test command."""

import os
import tomllib

from packaging.requirements import Requirement

from conftest import ROOT

README_TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest'


def project() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def installed_on(platform: str, requirements: list[str]) -> set[str]:
  """The names of `requirements` pip installs on `sys_platform == platform`."""
  names = set()
  for text in requirements:
    requirement = Requirement(text)
    if requirement.marker is None or requirement.marker.evaluate({"sys_platform": platform}):
      names.add(requirement.name)
  return names


def test_the_license_is_apache_2_in_spdx_form_and_ships():
  assert project()["license"] == "Apache-2.0"
  assert project()["license-files"] == ["LICENSE"]
  with open(os.path.join(ROOT, "LICENSE")) as f:
    text = f.read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text


def test_tensorflow_installs_on_linux_and_macos():
  dependencies = project()["dependencies"]
  linux, mac = installed_on("linux", dependencies), installed_on("darwin", dependencies)
  assert "tensorflow-cpu" in linux and "tensorflow" not in linux
  assert "tensorflow" in mac and "tensorflow-cpu" not in mac  # no tensorflow-cpu macOS wheels


def test_the_test_extra_declares_every_test_dependency_and_ci_runs_the_readme_command():
  test_extra = {Requirement(r).name for r in project()["optional-dependencies"]["test"]}
  assert {"pytest", "torch", "open-clip-torch"} <= test_extra
  with open(os.path.join(ROOT, "README.md")) as f:
    assert README_TEST_COMMAND in f.read()
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    assert f.read().rstrip().splitlines()[-1] == README_TEST_COMMAND
