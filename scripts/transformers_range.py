"""Prints the lowest transformers version of the range pyproject.toml declares (``--lowest``)."""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
spec = next(Requirement(d).specifier for d in deps if Requirement(d).name == "transformers")
if sys.argv[1:] == ["--lowest"]:
    print(next(s.version for s in spec if s.operator == ">="))
else:
    print(spec)
