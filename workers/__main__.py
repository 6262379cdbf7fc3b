"""`python -m workers`: run one worker loop on the configured registry."""
import logging
import sys

from registry.core import Registry

from .runner import worker_loop

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    worker_loop(Registry(), once="--once" in sys.argv)
