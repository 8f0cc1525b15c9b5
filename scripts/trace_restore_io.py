"""Trace what a restore reads from the disk, and when (its code is `fastvllm.restore.trace_io`).

python -m fastvllm.scripts.trace_restore_io SNAPSHOT [--warm] [--bucket-ms 25] [--json OUT]
"""

from fastvllm.restore.trace_io import main

if __name__ == "__main__":
    main()
