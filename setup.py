"""Build shim: the metadata and every setting live in pyproject.toml, except one list it cannot say.

The attack presets stay in the top-level ``attacks/`` folder (the copy users edit) and ship in the
wheel as the data-only package ``robustkit.presets.attacks``, mapped onto that folder by
``[tool.setuptools.package-dir]``. pyproject's ``packages.find`` only finds packages under their own
names in the tree, never a mapped one, so the packages are found here and the mapped one appended.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["robustkit", "robustkit.*"]), "robustkit.presets.attacks"])
