"""Fisher maps for any denoiser, without diffusers: the per-parameter method choice on plain torch modules."""
import pytest
import torch
from torch import nn

from lafq.diffusion import linear_schedule
from lafq.fisher import fisher_map
from lafq.persample import sq_grads
from lafq.models import Conditioning, Denoiser


class TokenDenoiser(nn.Module):
    """A token embedding looked up several times per sample and a Conv1d: neither splits by layer hooks."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x, t, ids):
        h = self.norm(self.lin(x + self.emb(ids).mean(1)[:, None]))
        return self.conv(h.flatten(1)[:, None]).reshape(x.shape)


def _denoiser(prediction_type="epsilon"):
    torch.manual_seed(0)
    cond = Conditioning({"ids": torch.tensor([[1, 2, 3], [4, 5, 6]])}, 2)
    return Denoiser(TokenDenoiser().double().eval(), lambda fn, x, t, kw: fn(x, t, kw["ids"]), linear_schedule(),
                    prediction_type, (1, 4), cond)


def test_layers_the_hooks_cannot_split_fall_back_to_vmap_and_stay_exact():
    den = _denoiser("v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(3, 1, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t, rows = torch.tensor([1, 300, 900]), torch.tensor([0, 1, 1])
    fast, methods = sq_grads(den, x0, noise, t, rows)
    slow, _ = sq_grads(den, x0, noise, t, rows, method="naive")
    assert methods == {"emb.weight": "vmap", "lin.weight": "hooks", "lin.bias": "hooks", "norm.weight": "hooks",
                       "norm.bias": "hooks", "conv.weight": "vmap", "conv.bias": "vmap"}
    for k in slow:
        assert torch.allclose(fast[k], slow[k], rtol=1e-9, atol=1e-20), k
    assert all(p.requires_grad for p in den.module.parameters())  # flags restored


def test_a_map_of_any_denoiser_names_its_methods_and_rejects_wrong_sample_shapes():
    den = _denoiser()
    images = torch.randn(5, 1, 4, dtype=torch.float64)
    fm = fisher_map(den, images, bins=2, samples_per_bin=3)
    assert fm.fisher.shape == (1, 7, 2) and fm.meta["fallback"]["vmap"] == ["conv.bias", "conv.weight", "emb.weight"]
    assert fm.layer_names() == ["emb", "lin", "norm", "conv"]
    with pytest.raises(ValueError, match=r"the model takes \(1, 4\)"):
        fisher_map(den, torch.randn(5, 2, 4), bins=1, samples_per_bin=1)
