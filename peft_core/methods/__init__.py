"""Built-in methods, one module per family (a subpackage for the two largest, ``laplace`` and
``prompts``); importing this package registers them all.

Every module and subpackage here is imported, so a new family only has to add its file;
names starting with ``_`` are helpers shared by several families.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
