"""Checkpoints never unpickle arbitrary objects: a planted malicious pickle is refused before
DeepSpeed's loader (which unpickles with weights_only=False) could run it."""

import os
import pickle

import pytest
import torch

from interestformer.jobs.distributed import UnsafeCheckpointError, check_pickles


class Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "deepspeed" / "deepspeed"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, folder / "mp_rank_00_model_states.pt")
    check_pickles(str(tmp_path / "deepspeed"))  # tensors and plain containers pass
    torch.save({"optimizer_state_dict": Payload(str(marker))}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|refusing"):
        check_pickles(str(tmp_path / "deepspeed"))
    assert not marker.exists()


def test_a_raw_pickle_that_is_not_a_torch_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "state.pt").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(UnsafeCheckpointError):
        check_pickles(str(tmp_path))
    assert not marker.exists()
