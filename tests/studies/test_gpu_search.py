"""GPU trials in a search: fractions of one GPU through Ray (resources.gpus), and the refusals.

Without CUDA only the refusals run: a space that puts trials on CUDA without reserving a GPU, and
a search that reserves GPUs on a Ray cluster that has none (Ray would leave them pending for
ever). With CUDA (``gpu`` marker) four trials share one GPU at 0.25 each and run concurrently.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("optuna")  # the device machine may have torch but not the search stack
pytest.importorskip("ray")

from _search_helpers import complete, write_space  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from mlbtc_search.errors import SpecError, UsageError  # noqa: E402
from studies.record import decode_attr  # noqa: E402
from studies.runner import run_search  # noqa: E402
from studies.space import load_space  # noqa: E402
from studies.storage import load_study, open_storage  # noqa: E402


@pytest.fixture
def artifacts_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLBTC_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv("MLBTC_TEST_TRIAL_HOOK", raising=False)


def test_cuda_trials_must_reserve_a_gpu(tmp_path) -> None:
    path = write_space(tmp_path / "tiny.yaml", train={"device": "cuda", "batch_size": 16})
    with pytest.raises(SpecError, match=r"train\.device 'cuda' needs resources\.gpus > 0"):
        load_space(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a cluster without GPUs")
def test_gpu_trials_on_a_cluster_without_gpus_are_refused(ray_local, tmp_path,
                                                          artifacts_env) -> None:
    path = write_space(tmp_path / "tiny.yaml", resources={"cpus": 0.5, "gpus": 0.25})
    space = load_space(path, {"storage": f"sqlite:///{tmp_path / 'db.sqlite'}"})
    with pytest.raises(UsageError, match=r"resources\.gpus=0\.25 per trial, but the Ray cluster "
                                         r"has 0 GPUs"):
        run_search(space)


@pytest.mark.gpu
def test_four_trials_share_one_gpu(ray_local, tmp_path, artifacts_env) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    path = write_space(tmp_path / "tiny.yaml", resources={"cpus": 0.25, "gpus": 0.25},
                       workers=4, trials=4, budget=2e8, baselines=[],
                       train={"lr": 3.0e-3, "batch_size": 16, "eval_batches": 2})
    outcome = run_search(load_space(path, {"storage": url}))
    assert outcome.snapshot.ok == 4, outcome.snapshot
    ts = load_study(open_storage(url, create=False), "tiny").get_trials(deepcopy=False)
    done = complete(ts)
    assert len(done) == 4 and all(t.state == TrialState.COMPLETE for t in done)
    total = torch.cuda.get_device_properties(0).total_memory
    gpus = [decode_attr(t.user_attrs["gpu"]) for t in done]  # stored as a JSON string
    for t, gpu in zip(done, gpus, strict=True):
        assert t.user_attrs["status"] == "ok" and gpu["share"] == 0.25
        assert gpu["cap_bytes"] == pytest.approx(0.95 * 0.25 * total, rel=1e-6)
    # packed: the four worker calls overlapped in time (all were on the GPU together)
    assert max(g["start"] for g in gpus) < min(g["end"] for g in gpus)
