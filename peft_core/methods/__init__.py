"""Built-in methods, one module per family; importing this package registers them all.

Every module in this package is imported, so a new family only has to add its file.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
