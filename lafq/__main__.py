import sys

from .cli import main

code = main()
if code == 130:
    # Interrupted: Ctrl-C can land inside a constructor (a ZipFile of np.savez before its `_writing` attribute is
    # set), and that half-built object's __del__ then fails at exit, printing a traceback after our one line (seen
    # in a fresh-clone run of tests/test_cli_errors.py). Finalizer errors after an interrupt are expected: silent.
    sys.unraisablehook = lambda _unraisable: None
sys.exit(code)
