"""What every `main_*.py` calls: run the family, turning bad input into one clear line and an exit code."""
from __future__ import annotations

import logging
import sys
import traceback

from ..errors import PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE, Preempted, UserError, debug_enabled
from ..io_utils import write_json

log = logging.getLogger("kt")


def _mode():
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN, hc.runtime.output_dir
    except Exception:
        return False, None


def entry(run, cfg):
    multirun, out = _mode()
    try:
        return run(cfg)
    except (UserError, Preempted) as e:
        if out is not None:
            status = "preempted" if isinstance(e, Preempted) else "failed"
            try:
                write_json(f"{out}/error.json" if status == "failed" else f"{out}/preempted.json",
                           {"status": status, "error": str(e)})
            except OSError:
                pass
        if debug_enabled():
            traceback.print_exc()
        if multirun:
            log.error("%s: %s", type(e).__name__, e)
            raise  # the sweeper records the failure; other jobs are not lost
        if isinstance(e, Preempted):
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
