import pytest
import torch

from lafq.diffusion import linear_schedule
from lafq.fisher import FisherMap, bin_edges, compute_fisher
from lafq.model import UNet
from lafq.models import from_lafq_unet
from lafq.persample import sq_grads
from tests.conftest import TINY


def naive_unet_sq_grads(m, s, x0, y, t, noise):
    """One backward per sample with the U-Net's own call and eps-MSE: no adapter involved."""
    acc = {k: torch.zeros_like(v) for k, v in m.named_parameters()}
    for i in range(len(x0)):
        m.zero_grad(set_to_none=True)
        abar = s.alphas_cumprod[t[i]].to(x0.dtype)  # float64 here (q_sample rounds abar to float32)
        xt = abar.sqrt() * x0[i:i + 1] + (1 - abar).sqrt() * noise[i:i + 1]
        torch.nn.functional.mse_loss(m(xt, t[i:i + 1], y[i:i + 1]), noise[i:i + 1]).backward()
        for k, p in m.named_parameters():
            acc[k] += p.grad.pow(2)
    m.zero_grad(set_to_none=True)
    return acc


def test_every_per_sample_method_through_the_unet_adapter_equals_a_naive_loop():
    torch.manual_seed(0)
    m = UNet(TINY).double().eval()
    s = linear_schedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(7, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 10, 9])
    t = torch.randint(0, 1000, (7,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    slow = naive_unet_sq_grads(m, s, x0, y, t, noise)
    den = from_lafq_unet(m, s)
    for method in ("hooks", "vmap", "naive"):  # chunk=3: chunking must not matter
        fast, used = sq_grads(den, x0, noise, t, y, method=method, chunk=3)
        assert set(used.values()) == {method}  # every U-Net layer splits by hooks: no fallback
        assert fast.keys() == slow.keys()
        for k in slow:
            assert torch.allclose(fast[k], slow[k], rtol=1e-9, atol=1e-20), k
    # ...and it is not the square of the mean gradient (the shortcut this module avoids).
    m.zero_grad()
    from lafq.train import diffusion_loss
    diffusion_loss(m, s, x0, y, t, noise).backward()
    k = "stem.weight"
    assert not torch.allclose(slow[k] / 7, m.stem.weight.grad.pow(2))


def test_hooks_refuse_what_they_cannot_split():
    from lafq.persample import hook_sq_grads
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(TypeError, match="Conv2d.*vmap"):
        hook_sq_grads(m, lambda: m(torch.zeros(1, 2, 5, 5)).flatten(1).sum(1))
    with pytest.raises(ValueError, match="choose one of"):
        compute_fisher(UNet(TINY), torch.zeros(4, 1, 28, 28), torch.arange(4), bins=1, samples_per_bin=1, method="fast")


@pytest.fixture(scope="module")
def fmap():
    torch.manual_seed(0)
    m = UNet(TINY).eval()
    from lafq.data import load_dataset
    x, y = load_dataset("mnist-train5k").tensors()
    return compute_fisher(m, x[::25], y[::25], bins=4, samples_per_bin=6, per_class=True), m


def test_map_shapes_groups_and_views(fmap):
    fm, m = fmap
    n = len(list(m.parameters()))
    assert fm.fisher.shape == (11, n, 4) and fm.groups[0] == "all" and fm.groups[1:] == [str(c) for c in range(10)]
    assert torch.allclose(fm.fisher[0], fm.fisher[1:].mean(0))
    _, norm = fm.view("normalized")
    assert norm.max() == 1 and norm.min() >= 0
    _, log = fm.view("log", group=7)
    assert log.max() == 0
    layers, per_layer = fm.view("raw", per_layer=True)
    assert layers[0] == "embed" and layers[-1] == "head" and per_layer.shape == (len(layers), 4)
    assert tuple(fm.magnitude.shape) == (n,) and (fm.magnitude >= 0).all() and fm.magnitude.max() > 0
    assert fm.channel["stem.weight"].shape == (11, 4, 8)
    with pytest.raises(ValueError, match="no '11'"):
        fm.view(group=11)


def test_scores_by_statistic(fmap):
    fm, _ = fmap
    raw = fm.fisher[0]
    k = fm.names.index("stem.weight")
    assert fm.score("final")["stem.weight"] == pytest.approx(raw[k, 0].item())
    assert fm.score("mean")["stem.weight"] == pytest.approx(raw[k].mean().item())
    assert fm.score("max")["stem.weight"] == pytest.approx(raw[k].max().item())
    with pytest.raises(ValueError, match="final"):
        fm.score("median")


def test_save_load_round_trip(fmap, tmp_path):
    fm, _ = fmap
    fm.save(tmp_path / "f.safetensors")
    back = FisherMap.load(tmp_path / "f.safetensors")
    assert back.names == fm.names and back.groups == fm.groups and back.bin_edges == fm.bin_edges
    assert torch.equal(back.fisher, fm.fisher) and torch.equal(back.channel["stem.weight"], fm.channel["stem.weight"])
    assert back.meta["checkpoint_digest"] == fm.meta["checkpoint_digest"]


def test_missing_class_is_named():
    m = UNet(TINY)
    x, y = torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"no images of class\(es\) \[4, 5"):
        compute_fisher(m, x, y, bins=1, samples_per_bin=2)


def test_bins_cover_all_timesteps():
    e = bin_edges(50)
    assert e[0] == 0 and e[-1] == 1000 and len(e) == 51
    assert len(bin_edges(1000)) == 1001
    with pytest.raises(ValueError, match="bins"):
        bin_edges(0)


def test_the_null_class_branch_that_guided_sampling_runs_gets_fisher():
    """Guidance evaluates the null class at every step; a map from conditional labels alone scores its
    embedding row exactly 0, which would make it look free to quantize."""
    torch.manual_seed(0)
    m = UNet(TINY).eval()
    from lafq.data import load_dataset
    x, y = load_dataset("mnist-train5k").tensors()
    null = m.cfg.num_classes
    rows = {}
    for p_null in (0.0, 0.5):
        fm = compute_fisher(m, x[::25], y[::25], bins=2, samples_per_bin=8, p_null=p_null)
        rows[p_null] = fm.channel["embed.class_emb.weight"][0, :, null]  # (bins,) for the null row
        assert fm.meta["p_null"] == p_null and f"{p_null:g}" in fm.meta["loss"]
    assert torch.all(rows[0.0] == 0) and torch.all(rows[0.5] > 0)
    with pytest.raises(ValueError, match="p_null"):
        compute_fisher(m, x[:4], y[:4], bins=1, samples_per_bin=1, p_null=1.5)



def test_a_file_that_is_not_a_complete_fisher_map_is_one_error_naming_it(tmp_path):
    from lafq.checkpoint import CheckpointError, save_file
    from lafq.fisher import FisherMap

    path = tmp_path / "f.safetensors"
    save_file(path, {"fisher": torch.zeros(1, 2, 3)}, {"kind": "fisher", "numels": [1]})  # no names
    with pytest.raises(CheckpointError, match=r"f.safetensors is not a complete Fisher map \(missing or malformed 'names'"):
        FisherMap.load(path)


def test_the_one_fisher_path_reproduces_maps_made_by_both_former_recipes():
    """The shipped map's recipe (class-balanced, null class at 0.1) and the labelled / unlabelled draws for other
    models, against values the two former implementations wrote: the draws (and so every map and plan made
    from them) did not change when they became one function. rtol: float32 gradients summed in another order
    on another CPU differ by about 1e-6; a changed draw changes the values by orders of magnitude more."""
    from pathlib import Path

    from safetensors import safe_open

    from lafq.data import load_dataset
    from lafq.fisher import fisher_map

    with safe_open(str(Path(__file__).parent / "golden" / "fisher_tiny.safetensors"), "pt") as f:
        golden = {k: f.get_tensor(k) for k in f.keys()}
    torch.manual_seed(0)
    m = UNet(TINY)
    x, y = load_dataset("mnist-train5k").tensors()
    x, y = x[::50], y[::50]
    kw = dict(bins=3, samples_per_bin=5, seed=2, chunk=3)
    den = from_lafq_unet(m)
    got = {"per_class_balanced": compute_fisher(m, x, y, per_class=True, **kw).fisher,
           "labelled_uniform": fisher_map(den, x, labels=y, p_null=0.1, **kw).fisher,
           "rows_uniform": fisher_map(den, x, **kw).fisher}
    for k, v in golden.items():
        assert torch.allclose(got[k], v, rtol=1e-4, atol=0), k


def test_draw_options_are_checked_before_any_work():
    m = UNet(TINY)
    den = from_lafq_unet(m)
    x, y = torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    from lafq.fisher import fisher_map
    with pytest.raises(ValueError, match="need labels"):
        fisher_map(den, x, per_class=True, bins=1, samples_per_bin=1)
    with pytest.raises(ValueError, match="choose one of"):
        fisher_map(den, x, labels=y, draws="stratified", bins=1, samples_per_bin=1)
    with pytest.raises(ValueError, match=r"conditioning rows in \[0, 11\)"):
        fisher_map(den, x, labels=torch.tensor([0, 1, 2, 11]), bins=1, samples_per_bin=1)
    with pytest.raises(ValueError, match="give labels, or p_null=0"):
        fisher_map(den, x, p_null=0.5, bins=1, samples_per_bin=1)
