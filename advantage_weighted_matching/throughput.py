"""Per-epoch throughput: images per second, and on CUDA the MFU and peak memory (issue I.5).

Keys `ThroughputMeter.epoch_log` returns (per GPU; every rank runs the same sizes):

* ``perf/rollout_images_per_s``: images sampled / seconds of the SAMPLE phase (prompt
  encoding, solver, decoding);
* ``perf/epoch_images_per_s``: images sampled / seconds of SAMPLE + REWARD wait + TRAIN
  (evaluation and checkpoints, which come every few epochs, are left out);
* CUDA only: ``perf/mfu_rollout`` and ``perf/mfu_train`` = FLOPs / GPU seconds / peak FLOP/s
  of the rollout chunks (transformer calls and the VAE decode) and of the training
  micro-batches (policy forward and backward, base and KL-EMA forwards);
  ``perf/tflops_rollout`` / ``perf/tflops_train`` the achieved TFLOP/s (independent of the
  peak assumed); ``perf/peak_gib_sample`` / ``perf/peak_gib_train`` =
  ``torch.cuda.max_memory_allocated`` of each phase, GiB;
* ``perf/compile_s``: cumulative seconds spent in torch.compile, when anything compiled
  (a value that keeps growing after the first epochs means recompiles).

FLOPs are counted once per kind, on its first call, with
``torch.utils.flop_counter.FlopCounterMode`` (compiled regions run eagerly for that call, so
every matmul, convolution and attention is seen), as FLOPs per row; later calls reuse it
(FLOPs are linear in the batch: each image's tokens attend only to its own). With gradient
checkpointing the count includes the recomputed forward (hardware FLOPs). The counted call is
left out of the timing. Each later call records two CUDA events, which do not synchronise;
`epoch_log` waits for the last event once, at the end of the epoch.
"""

import contextlib
import time

import torch


def count_flops(fn):
    """(fn(), FLOPs of everything fn ran)."""
    counted = {}
    with flop_counting(counted):
        result = fn()
    return result, counted["flops"]


@contextlib.contextmanager
def flop_counting(counted):
    """Count the FLOPs of the block into ``counted["flops"]`` with FlopCounterMode; compiled
    code runs eagerly meanwhile (the counter sees only eager aten ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") \
        else contextlib.nullcontext()
    with eager, FlopCounterMode(display=False) as counter:
        yield
    counted["flops"] = counter.get_total_flops()


class ThroughputMeter:
    """Times measured regions without host-device syncs and turns them into per-epoch rates.

    `measure(kind, rows)` wraps one call of a kind ("rollout": a rollout chunk of `rows`
    images; "train": a micro-batch of `rows` samples). `mfu` (default: on CUDA) enables FLOP
    counting and region timing; on CPU only the phase rates are logged.
    """

    def __init__(self, device, peak_tflops=989.0, mfu=None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.mfu = self.cuda if mfu is None else mfu
        self.peak = peak_tflops * 1e12
        self.flops_per_row = {}  # kind -> FLOPs of one row
        self.records = []  # (kind, rows, start, end): CUDA events, or perf_counter floats off CUDA
        self.peaks = {}

    def start_epoch(self):
        self.records, self.peaks = [], {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def end_phase(self, phase):
        """Record the phase's peak memory (CUDA) and start the next phase's count."""
        if self.cuda:
            self.peaks[phase] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def measure(self, kind, rows):
        if not self.mfu:
            yield
            return
        if kind not in self.flops_per_row:  # first call: count, do not time
            counted = {}
            with flop_counting(counted):
                yield
            self.flops_per_row[kind] = counted["flops"] / rows
            return
        start = self._stamp()
        yield
        self.records.append((kind, rows, start, self._stamp()))

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, start, end):
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def epoch_log(self, timings, images):
        """The epoch's ``perf/*`` scalars from the phase `timings` (seconds) and the images sampled."""
        from advantage_weighted_matching.speed import compile_seconds

        log = {}
        if timings.get("sample"):
            log["perf/rollout_images_per_s"] = images / timings["sample"]
        epoch_s = sum(timings.get(key, 0.0) for key in ("sample", "reward_wait", "train"))
        if epoch_s:
            log["perf/epoch_images_per_s"] = images / epoch_s
        if self.records and self.cuda:
            self.records[-1][3].synchronize()  # the one wait of the epoch
        for kind in sorted({record[0] for record in self.records}):
            mine = [record for record in self.records if record[0] == kind]
            seconds = sum(self._seconds(start, end) for _, _, start, end in mine)
            flops = self.flops_per_row[kind] * sum(rows for _, rows, _, _ in mine)
            if seconds > 0:
                log[f"perf/tflops_{kind}"] = flops / seconds / 1e12
                log[f"perf/mfu_{kind}"] = flops / seconds / self.peak
        log.update({f"perf/peak_gib_{phase}": gib for phase, gib in self.peaks.items()})
        compiled = compile_seconds()
        if compiled:
            log["perf/compile_s"] = compiled
        return log

