"""``python -m tests.slow_save ARGS``: the ``opdlm`` command line with every checkpoint file write
slowed by ``SLOW_SAVE_S`` seconds (default 3), so that a test can signal the process tree while
megatron-core's writer processes are writing (a real save of a large model takes that long)."""

import os
import sys
import time

from megatron.core.dist_checkpointing.strategies import filesystem_async

_write = filesystem_async.FileSystemWriterAsync.write_preloaded_data


def _slow_write(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_SAVE_S", "3")))  # in the forked writer process
    return _write(*args, **kwargs)


filesystem_async.FileSystemWriterAsync.write_preloaded_data = staticmethod(_slow_write)

if __name__ == "__main__":
    from nemo_opdlm.cli import main

    sys.exit(main())
