"""Entry point run by torchrun for ``tests.dist.torchrun``: imports module:function and calls it."""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    module_name, fn_name = sys.argv[1].split(":")
    getattr(importlib.import_module(module_name), fn_name)(sys.argv[2])
