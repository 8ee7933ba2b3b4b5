"""Lets PyPI's torchvision import beside a CPU torch that lacks its C++ ops (peer venv only).

torchvision/_meta_registrations.py registers fake kernels for `torchvision::nms` and `qnms`
unconditionally, which fails with "operator torchvision::nms does not exist" when the ops are
missing. This rewrites those decorators to skip ops that `torch.ops.torchvision` lacks. Idempotent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MARK = "fastadapt-peer-patch"
ANCHOR = "import torchvision.extension  # noqa: F401\n"
DECORATOR = "@torch.library.register_fake("
HELPER = f'''

# {MARK}: skip fake kernels of ops this torch build lacks (CPU torch beside PyPI's torchvision).
def _register_fake_if_present(name):
    if hasattr(torch.ops.torchvision, name.split("::")[1]):
        return torch.library.register_fake(name)
    return lambda fn: fn
'''


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    assert spec is not None and spec.submodule_search_locations, "torchvision is not installed"
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    source = path.read_text()
    if MARK in source:
        return
    if ANCHOR not in source or DECORATOR not in source:
        raise SystemExit(f"{path}: unexpected content, this patch fits torchvision 0.28.0")
    source = source.replace(ANCHOR, ANCHOR + HELPER, 1).replace(DECORATOR, "@_register_fake_if_present(")
    path.write_text(source)
    print(f"patched {path}")


if __name__ == "__main__":
    main()
