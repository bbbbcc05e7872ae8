"""I/O fault injection for the tests (issue 15): an LD_PRELOAD shim over pread (``faultshim.c``), its build
and control (:mod:`faults.shim`) and the child process that runs the public API under it (``child.py``)."""
