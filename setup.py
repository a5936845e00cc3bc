"""The repository root is the `glmserve` package (pyproject's package-dir): every folder with an `__init__.py`
below it, except the tests, is one of its subpackages. pyproject cannot prefix found packages, hence this file."""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Leaves this file out of the package it sits in."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[:2] != ("glmserve", "setup")]


setup(
    packages=["glmserve", *(f"glmserve.{p}" for p in find_packages(exclude=["tests", "tests.*"]))],
    cmdclass={"build_py": BuildPy},
)
