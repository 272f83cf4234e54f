"""Dataset name → reader. Every reader is `reader(root, **options)` with keyword-only options
documented in its docstring; the CLI passes `key=value` options through unchanged (strings are
coerced by the readers), and an unknown option is a TypeError naming it."""
from __future__ import annotations

from collections.abc import Callable

from .affectnet import read_affectnet
from .base import DatasetSource
from .csv_list import read_csv
from .dfew import read_dfew
from .ferv39k import read_ferv39k
from .folder import read_folder
from .mafw import read_mafw
from .rafdb import read_rafdb
from .voxceleb2 import read_voxceleb2
from ..synthetic import read_synthetic

READERS: dict[str, Callable[..., DatasetSource]] = {
    "affectnet": read_affectnet,
    "rafdb": read_rafdb,
    "voxceleb2": read_voxceleb2,
    "dfew": read_dfew,
    "ferv39k": read_ferv39k,
    "mafw": read_mafw,
    "folder": read_folder,
    "csv": read_csv,
    "synthetic": read_synthetic,
}
