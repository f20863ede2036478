"""Why a run stops before its last epoch, and how it does so without losing work.

* `StopSignals`: SIGINT (Ctrl-C), SIGTERM and SIGHUP only set a flag; the
  training loop saves a checkpoint at its next safe point and exits with
  128 + the signal number (130, 143, 129). The process also asks the kernel for
  SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so a rank whose launcher
  or torch elastic agent was killed outright (SIGKILL) saves and exits instead
  of training on as an orphan.
* `RewardOutage`: stops the run, after a checkpoint, once too many epochs in a
  row had most of their reward calls failing.
* `TrainingHalted`: the error both guards end the run with (one line, exit 1).
"""

import ctypes
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


class TrainingHalted(RuntimeError):
    """The run stopped on purpose after saving a checkpoint; the message says why."""


class StopSignals:
    """Handlers for SIGINT / SIGTERM / SIGHUP that record the first signal instead of
    raising; `signum` is 0 until one arrives. Install once, in the main thread. The
    handler only records (printing from a handler can collide with the interrupted
    write); the loop reports the stop when it acts on it."""

    def __init__(self):
        self.signum = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        _die_with_parent(signal.SIGTERM)

    def _handle(self, signum, frame):
        del frame
        self.signum = self.signum or signum

    @staticmethod
    def describe(signum):
        return f"{signal.Signals(signum).name} received: checkpoint saved, exiting with {128 + signum}"


def _die_with_parent(sig):
    """Linux: deliver `sig` to this process when its parent exits (kept across exec)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's signal forwarding still applies
        pass


class RewardOutage:
    """Counts epochs in a row in which at least `max_fraction` of the reward calls failed
    (an image scored by two rewards counts twice). `update` returns the reason to stop
    once `max_epochs` such epochs came in a row, else None."""

    def __init__(self, max_fraction, max_epochs):
        self.max_fraction, self.max_epochs, self.streak = max_fraction, max_epochs, 0

    def update(self, num_failures, num_calls):
        fraction = num_failures / max(num_calls, 1)
        self.streak = self.streak + 1 if fraction >= self.max_fraction else 0
        if self.streak >= self.max_epochs:
            return (f"reward outage: {num_failures} of {num_calls} reward calls failed this epoch ({fraction:.0%}), "
                    f"{self.streak} epoch(s) in a row at or above rewards.max_failure_fraction={self.max_fraction}; "
                    f"fix the reward and resume")
        return None
