"""The one display of a training run, on the driver: a progress bar over the run's batches and a
line per epoch (batches, loss, samples/s, validation), fed by rank 0 through a small actor.

The workers' own output, and every library's, goes to Ray's log folder
(`/tmp/ray/session_latest/logs`); `experiment.verbose` (`--verbose`) also streams it to the
console, as Ray does by default. The driver draws the display, not a worker, so it is one bar
that no other process writes into, and the final table comes on lines of its own.
"""

import logging
import os
import threading
import time

import ray


def quiet_console(verbose: bool):
    """This process's share of a clean console: unless verbose, MLflow's INFO lines and artifact
    progress bars and Ray Data's warnings are not printed (Ray's own lines are kept off by
    ray.init(log_to_driver=..., logging_level=...), jobs.cluster.start_ray)."""
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # what mlflow's import sets its logger to
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])  # if imported already


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where rank 0 posts the run's progress and the driver reads it. Lives as long as the driver's
    handle, so a run whose workers restart (a killed worker) keeps one display."""

    def __init__(self):
        self.done, self.total, self.description, self.lines = 0, 0, "", []

    def post(self, done: int, total: int, description: str, line: str = ""):
        self.done, self.total, self.description = done, total, description
        if line:
            self.lines.append(line)

    def read(self, seen_lines: int) -> tuple[int, int, str, list[str]]:
        return self.done, self.total, self.description, self.lines[seen_lines:]


class WorkerProgress:
    """Rank 0's side: counts batches and posts at most every `interval_s` (fire and forget, so a
    step never waits on the driver), and each epoch's line at once. Other ranks post nothing."""

    def __init__(self, board, rank: int, total: int, done: int, note: str = "", interval_s: float = 0.5):
        """done: batches a resumed run has behind it; note: a line to show first."""
        self.board = board if rank == 0 else None
        self.total, self.done, self.description = total, done, "training"
        self.interval_s, self.posted = interval_s, 0.0
        self._post(note)

    def update(self, n: int = 1):
        self.done += n
        if time.monotonic() - self.posted >= self.interval_s:
            self._post()

    def epoch(self, line: str, description: str):
        self.description = description
        self._post(line)

    def close(self):
        self._post()

    def _post(self, line: str = ""):
        if self.board is not None:
            self.board.post.remote(self.done, self.total, self.description, line)
            self.posted = time.monotonic()


class DriverDisplay:
    """The driver's side, as a context manager around the run: a thread draws the bar and prints
    each new epoch line above it until the run returns."""

    def __init__(self, board, interval_s: float = 0.5):
        self.board, self.interval_s = board, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._draw, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _draw(self):
        from tqdm import tqdm

        bar, seen = None, 0
        while True:
            stopping = self.stop.wait(self.interval_s)
            try:  # the last read waits longer: it brings the run's last lines
                done, total, description, lines = ray.get(self.board.read.remote(seen), timeout=60 if stopping else 10)
            except ray.exceptions.GetTimeoutError:  # a busy machine (the board's process still
                if stopping:  # starting, say): the lines wait on the board for the next read
                    break
                continue
            except ray.exceptions.RayError:  # the board is gone with the cluster: nothing left to draw
                break
            if total and bar is None:
                bar = tqdm(total=total, unit="batch", dynamic_ncols=True)
            for line in lines:
                (bar.write if bar is not None else print)(line)
            seen += len(lines)
            if bar is not None:
                bar.set_description(description, refresh=False)
                bar.update(done - bar.n)
            if stopping:
                break
        if bar is not None:
            bar.close()
