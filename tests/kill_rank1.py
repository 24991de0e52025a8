"""`vlmtax ...` as a launched process; process 1 is SIGKILLed as it starts its second batch
(tests/test_predict.py launches it to leave an interrupted share behind)."""

import os
import signal
import sys

import vlmtax.predict
from vlmtax.cli import main

if os.environ.get("RANK") == "1":
    _decode_batch, _calls = vlmtax.predict.decode_batch, []

    def _dies_on_second_batch(*args, **kwargs):
        _calls.append(1)
        if len(_calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return _decode_batch(*args, **kwargs)

    vlmtax.predict.decode_batch = _dies_on_second_batch

sys.argv = ["vlmtax", *sys.argv[1:]]
main()
