"""`python -m tests.serve_with_faults ARGS...`: `trtllm-bdlora ARGS...` whose scheduler raises while sampling every
request on the adapter that FAULT_ADAPTER_ENV names, for tests of fault isolation (the production scheduler has no
such hook). The ranks it starts run this module too, so the hook is in rank 0's scheduler whatever the TP."""

import os
import sys

from trtllm_bdlora import cli
from trtllm_bdlora.engine.scheduler import Scheduler

FAULT_ADAPTER_ENV = "TRTLLM_BDLORA_TEST_FAULT_ADAPTER"


def install_fault(adapter: int) -> None:
    """Sampling raises for requests on `adapter`, as an internal error while serving one request would."""
    sample = Scheduler._sample_into

    def faulty(self, running, row):
        if running.req.adapter == adapter:
            raise RuntimeError(f"injected fault (adapter {adapter})")
        return sample(self, running, row)

    Scheduler._sample_into = faulty


if __name__ == "__main__":
    install_fault(int(os.environ[FAULT_ADAPTER_ENV]))
    sys.exit(cli.main(rank_module="tests.serve_with_faults"))
