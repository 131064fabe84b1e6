"""Finds the packages, so that none is listed by hand: ``lightreg`` with its subpackages, and ``conf/`` (the Hydra
configs at the repository top) shipped as ``lightreg.conf`` with each of its folders (they hold only yaml).
Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, find_packages, setup

CONF = ["lightreg.conf"] + [f"lightreg.conf.{name}" for name in find_namespace_packages("conf")]
setup(packages=find_packages(include=["lightreg", "lightreg.*"]) + CONF)
