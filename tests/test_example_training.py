"""examples/training.py's loop: `train` calls its checkpoint every N steps (train_bdlora.py --save-every) and learns."""

import sys
from types import SimpleNamespace

import torch

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "examples"))
from training import train  # noqa: E402


class _Regression(torch.nn.Module):
    """A linear map fitted by mean squared error, called as a causal LM is (input_ids, attention_mask, labels)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, input_ids, attention_mask, labels):
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.linear(input_ids).squeeze(-1), labels))


def test_train_checkpoints_every_n_steps_and_fits():
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(4, generator=gen)
    x = torch.randn(64, 4, generator=gen)
    batches = iter([(x, x @ weights + 0.5, torch.ones(64))] * 200)
    model, saved = _Regression(), []
    first = torch.nn.functional.mse_loss(model.linear(x).squeeze(-1), x @ weights + 0.5).item()
    stats = train(model, batches, steps=200, lr=0.05, log=None, checkpoint=saved.append, checkpoint_every=60)
    assert saved == [60, 120, 180]  # not after the last step: the final save is the caller's
    assert len(stats["losses"]) == 200 and stats["final_loss"] < first / 100
