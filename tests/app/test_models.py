"""The model selector: the registry (shipped models, LAFQ_MODELS), every tab's handlers on a tiny diffusers
folder given through LAFQ_MODELS, and per-session selections behind a real server."""
import json
import re
import logging
import os
import shutil

import numpy as np
import plotly.graph_objects as go
import pytest
from pathlib import Path
import torch

from lafq import paths
from demo import tab_compare, tab_fisher, tab_inside, tab_quality, tab_quantize
from demo.models import ModelInfo, Registry, discover
from demo.presets import PRESETS, UNIFORM_INT4
from demo.state import DEFAULT_MODEL, InputError, UserSession


@pytest.fixture(scope="module")
def tiny(models):
    """(the tiny model's state, a session that selected it)."""
    user = models.select(UserSession(), models.ids[1])
    return models.state_for(user), user


def uniform(target="int8"):
    return tab_quantize.policy_from_controls("uniform", target, "final", -2, -10, 0, 0, 0.25, 0, 6, False)


# -- the registry ----------------------------------------------------------------------------------

def test_the_registry_lists_the_mnist_unet_first_then_the_lafq_models_folders(models, tiny_dir):
    assert models.ids[0] == DEFAULT_MODEL and models.entries[0].path == paths.UNET
    assert models.choices()[1] == ("Tiny UNet2DModel (test)", "tiny-unet2dmodel-test")
    assert models.entries[1].path == tiny_dir and models.entries[1].info.classes == ("circle", "square")


def test_a_fashion_folder_is_listed_after_the_mnist_unet_when_it_holds_a_model(tiny_dir, tmp_path):
    assert [e.id for e in discover({}, shipped=(("fashion", tmp_path / "absent"),))] == [DEFAULT_MODEL]
    entries = discover({"LAFQ_MODELS": str(tiny_dir)}, shipped=(("fashion", tiny_dir),))
    assert [e.id for e in entries] == [DEFAULT_MODEL, "fashion"]  # the same folder twice is listed once


def test_malformed_lafq_models_entries_are_skipped_with_one_warning_line_each(tiny_dir, tmp_path, caplog):
    bad_json = tmp_path / "bad-json"
    shutil.copytree(tiny_dir, bad_json)
    (bad_json / "lafq.json").write_text("{not json")
    bad_guidance = tmp_path / "bad-guidance"
    shutil.copytree(tiny_dir, bad_guidance)
    (bad_guidance / "lafq.json").write_text(json.dumps({"guidance": 2.0}))  # guidance without a null class
    no_scheduler = tmp_path / "no-scheduler"
    shutil.copytree(tiny_dir / "unet", no_scheduler / "unet")
    listed = os.pathsep.join(str(p) for p in (tmp_path / "missing", bad_json, tiny_dir, bad_guidance, no_scheduler, ""))
    with caplog.at_level(logging.WARNING, logger="lafq.app"):
        entries = discover({"LAFQ_MODELS": listed}, shipped=())
    assert [e.path for e in entries[1:]] == [tiny_dir]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4 and all("\n" not in w and "LAFQ_MODELS entry" in w for w in warnings)
    assert "not a directory" in warnings[0] and "not readable JSON" in warnings[1]
    assert "needs null_class" in warnings[2] and "scheduler_config.json" in warnings[3]


def _hostile_folders(tiny_dir, root):
    """LAFQ_MODELS entries that once stopped the app from starting or broke every Generate: name -> folder."""
    out = {}

    def copy(name, lafq_json=None):
        out[name] = root / name
        shutil.copytree(tiny_dir, out[name], symlinks=True)
        if lafq_json is not None:
            (out[name] / "lafq.json").write_text(lafq_json)
        return out[name]

    copy("classes-null", '{"classes": null}')
    copy("classes-int", '{"classes": 5}')
    copy("deep", "[" * 100_000 + "]" * 100_000)
    copy("huge-json", json.dumps({"name": "x" * (2 << 20)}))
    (copy("self-link") / "lafq.json").unlink()
    (out["self-link"] / "lafq.json").symlink_to(out["self-link"] / "lafq.json")
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    out["loop"] = root / "loop-a"
    big = copy("sample-size")
    cfg = json.loads((big / "unet" / "config.json").read_text())
    (big / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 23170}))
    steps = copy("timesteps")
    sched = json.loads((steps / "scheduler" / "scheduler_config.json").read_text())
    (steps / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "num_train_timesteps": 10**8}))
    return out


def test_hostile_lafq_models_entries_are_skipped_and_the_other_models_still_listed(tiny_dir, tmp_path, caplog):
    bad = _hostile_folders(tiny_dir, tmp_path)
    listed = os.pathsep.join(str(p) for p in (*bad.values(), tiny_dir))
    with caplog.at_level(logging.WARNING, logger="lafq.app"):
        entries = discover({"LAFQ_MODELS": listed}, shipped=())
    assert [e.path for e in entries[1:]] == [tiny_dir]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(bad) and all("\n" not in w and len(w) < 600 for w in warnings)
    # A symlink loop: Python <= 3.12's resolve() names the loop, 3.13's resolves it and the folder is no directory.
    for words, w in zip(["classes must be a list", "classes must be a list", "not readable JSON", "bytes; at most",
                         "not a regular file", "Symlink loop|not a directory", "sample_size must be",
                         "num_train_timesteps must be"], warnings):
        assert re.search(words, w), w


def test_a_model_name_with_markup_is_shown_as_plain_text(tiny_dir, tmp_path):
    folder = tmp_path / "markup"
    shutil.copytree(tiny_dir, folder)
    info = json.loads((tiny_dir / "lafq.json").read_text())
    (folder / "lafq.json").write_text(json.dumps({**info, "name": "<img src=x onerror=alert(1)> **bold** [l](u)"}))
    (entry,) = discover({"LAFQ_MODELS": str(folder)}, shipped=())[1:]
    assert entry.name == "img src x onerror alert(1) bold l (u)"
    with pytest.raises(ValueError, match="class names must be plain text"):
        ModelInfo(classes=("<b>a</b>",))


def test_a_folder_that_loads_but_cannot_sample_is_refused_at_selection_in_one_line(app_state, tmp_path):
    from tests.diffusers_tiny import save_pipeline_dir, tiny_unet2d_condition

    # Cross-attention: it needs encoder_hidden_states, which the app does not supply.
    folder = save_pipeline_dir(tmp_path / "sd", tiny_unet2d_condition())
    reg = Registry(app_state, discover({"LAFQ_MODELS": str(folder)}, shipped=()))
    with pytest.raises(InputError, match="loads but does not sample here") as e:
        reg.select(UserSession(), reg.ids[1])
    assert "\n" not in str(e.value)
    assert reg.get(DEFAULT_MODEL) is app_state


def test_a_class_conditional_dit_folder_is_selectable_with_its_classes(app_state, tmp_path):
    from tests.diffusers_tiny import save_pipeline_dir, tiny_dit

    folder = save_pipeline_dir(tmp_path / "dit", tiny_dit())  # its label rows, then its classifier-free row
    reg = Registry(app_state, discover({"LAFQ_MODELS": str(folder)}, shipped=()))
    state = reg.select(UserSession(), reg.ids[1])
    state = reg.get(reg.ids[1])
    assert state.den.source["class"] == "DiTTransformer2DModel" and len(state.den.conditioning.kwargs["class_labels"]) == 11
    assert state.den.null_row == 10  # diffusers' classifier-free label row, without a card saying so


def test_a_model_that_fails_to_load_is_a_one_line_input_error_and_the_registry_keeps_serving(app_state, tiny_dir,
                                                                                              tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    reg = Registry(app_state, discover({"LAFQ_MODELS": str(broken)}, shipped=()))
    with pytest.raises(InputError, match="could not be loaded") as e:
        reg.get(reg.ids[1])
    assert "\n" not in str(e.value)
    assert reg.get(DEFAULT_MODEL) is app_state
    with pytest.raises(InputError, match="model must be one of"):
        reg.select(UserSession(), "no-such-model")


def test_a_model_whose_package_is_missing_says_which_and_how_to_install_it(app_state, tiny_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_diffusers(name, *args, **kw):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
        return real_import(name, *args, **kw)

    reg = Registry(app_state, discover({"LAFQ_MODELS": str(tiny_dir)}, shipped=()))
    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(InputError, match="needs the package 'diffusers'.*pip install -r requirements.txt") as e:
        reg.get(reg.ids[1])
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert reg.get(reg.ids[1]).model_id == reg.ids[1]  # installed again: the same registry loads it


def test_model_info_refuses_bad_values_in_one_line():
    for bad, message in [({"classes": "abc"}, "classes must be a list"), ({"null_class": 0, "classes": ["a"]}, "null_class"),
                         ({"guidance": float("nan"), "null_class": 1}, "guidance must be"), ({"name": 3}, "name must be")]:
        with pytest.raises(ValueError, match=message):
            ModelInfo(**bad)


def test_each_model_loads_once_into_its_own_state_of_the_one_class_sharing_the_heavy_slot(models, app_state, tiny):
    state, user = tiny
    assert models.get(user.model) is state and state is not app_state
    assert state.heavy is app_state.heavy and state.jobs is app_state.jobs  # one heavy job at a time, any model
    assert type(state) is type(app_state) and state.classes == ("circle", "square") and state.guided


def test_selecting_a_model_changes_only_that_session_and_drops_its_recomputed_map(models, app_state):
    mine = UserSession(fisher=app_state.fisher, fisher_note="mine")
    other = UserSession()
    switched = models.select(mine, models.ids[1])
    assert switched.model == models.ids[1] and switched.fisher is None
    assert mine.model == DEFAULT_MODEL and other.model == DEFAULT_MODEL  # frozen: nothing else changed
    assert models.state_for(other) is app_state and models.state_for(None) is app_state


# -- every tab on the tiny diffusers model -----------------------------------------------------------

def test_the_fisher_tab_groups_diffusers_tensors_by_their_first_two_names(tiny):
    state, user = tiny
    c = tab_fisher.model_controls(state, user)
    assert c["groups"] == ["all", "0", "1"] and c["layers"][0] == "conv_in" and "down_blocks.0" in c["layers"]
    assert c["layers"].index("mid_block.resnets") < c["layers"].index("up_blocks.0")  # the order the sample flows
    heat, mag, bar = tab_fisher.fisher_figures(state, "log", "all", "layers", 2, "down_blocks.0", user)
    assert list(heat.data[0].y) == c["layers"] and len(mag.data[0].x) == len(c["layers"])
    assert "resnets.0.conv1.weight" in bar.data[0].x and "down_blocks.0" in bar.layout.title.text.replace("<br>", " ")
    heat_t, _, _ = tab_fisher.fisher_figures(state, "raw", "all", "tensors", 0, "conv_in", user)
    assert len(heat_t.data[0].y) == len(state.shapes)
    with pytest.raises(InputError, match="no per-class maps"):
        tab_fisher.fisher_figures(state, "log", "1", "layers", 0, "conv_in", user)
    with pytest.raises(InputError, match="layer must be one of"):
        tab_fisher.fisher_figures(state, "log", "all", "layers", 0, "down1", user)


def test_a_fisher_recompute_on_a_model_without_a_dataset_is_refused_in_one_line(tiny):
    state, user = tiny
    with pytest.raises(InputError, match="names no dataset"):
        tab_fisher.recompute(state, 2, 2, False, user=user)
    with pytest.raises(InputError, match="names no dataset"):
        tab_fisher.recompute(state, 2, 2, True, user=user)


def test_the_quantize_tab_reads_out_the_diffusers_model_with_every_preset_on_its_own_layers(tiny, app_state):
    state, user = tiny
    shown = tab_quantize.shown_presets(state)
    assert shown == list(PRESETS) and tab_quantize.model_note(state) == tab_quantize.model_note(app_state) == ""
    cur = tab_quantize.preset_current(state)
    md, rows, fig = tab_quantize.readout(state, cur, user)
    fp32 = 4 * sum(p.numel() for p in state.model.parameters())
    assert f"FP32 is {fp32:,} bytes" in md and "budget" in md and isinstance(fig, go.Figure)
    assert "down_blocks.0" in fig.data[-1].y  # the plan drawn by the model's own layers
    edge = tab_quantize.resolve_plan(state, tab_quantize.preset_current(
        state, "INT4 with INT8 stem and head (the usual recipe)"), user).precisions
    assert {p for n, p in edge.items() if n.startswith(("conv_in.", "conv_out.")) and n.endswith("weight")} == {"int8"}
    groups = tab_quantize.policy_from_controls("groups", "fp16", "final", -2, 0, -10, -10, 0.25, 0, 6, True)
    plan = tab_quantize.resolve_plan(state, groups, user).precisions  # encoder to FP16, the middle block kept
    assert plan["conv_in.weight"] == "fp16" and all(p == "fp32" for n, p in plan.items() if n.startswith("mid_block."))


def test_an_export_of_a_diffusers_plan_loads_back_as_that_model_and_uploads_as_its_plan(tiny, tmp_path):
    import shutil

    from lafq.quantize import load_quantized

    state, user = tiny
    model_path, plan_path = tab_quantize.export(state, uniform(), user, session="models-test")
    q, _ = load_quantized(model_path)
    assert type(q).__name__ == "QuantizedUNet2DModel"
    cur = tab_quantize.load_upload(state, plan_path)
    assert set(cur["plan"]) == set(state.shapes)
    assert tab_quantize.load_upload(state, model_path)["plan"] == cur["plan"]  # quantized uploads: any model
    other = tmp_path / "unet-q.safetensors"
    shutil.copy(Path(__file__).parents[1] / "golden" / "quantized_unet_v1.safetensors", other)
    with pytest.raises(InputError, match="is another network: a UNet, not a UNet2DModel"):
        tab_quantize.load_upload(state, str(other))


def test_compare_samples_the_diffusers_model_by_class_with_guidance_from_the_same_noise(tiny):
    state, user = tiny
    fp32, plan, uni, diff, md = tab_compare.compare(state, uniform("fp16"), "1", 1.5, 2, 0, 2, True, user)
    assert fp32.shape == plan.shape == uni.shape and fp32.dtype.name == "uint8"
    assert "Tiny UNet2DModel (test)" in md and "guidance 1.5" in md and isinstance(diff, go.Figure)
    again = tab_compare.compare(state, uniform("fp16"), "1", 1.5, 2, 0, 2, False, user)
    assert (again[0] == fp32).all() and again[2] is None  # same seed, same images
    assert tab_compare.class_choices(state) == [("any", "any"), ("circle", "0"), ("square", "1")]
    with pytest.raises(InputError, match="class must be in"):
        tab_compare.compare(state, uniform(), "2", 1.5, 2, 0, 2, False, user)  # 2 is the null class, not a choice


def test_quality_says_in_one_line_that_it_needs_a_classifier(tiny):
    state, user = tiny
    md, fig, same = tab_quality.evaluate(state, uniform(), 20, 2, 1, True, user=user)
    assert md == "not available for this model: no classifier shipped" and same.evaluations == ()
    assert isinstance(fig, go.Figure) and "no classifier" in tab_quality.model_note(state)


def test_the_inside_tab_traces_a_diffusers_model_by_its_own_layers(tiny):
    state, user = tiny
    layers = tab_inside.spatial_layers(state)
    assert "conv_in" in layers and not {"down1", "stem"} & set(layers)
    heat, maps = tab_inside.activations(state, "1", 4, 0, layers[-1])
    assert "down_blocks.0" in list(heat.data[0].y) and isinstance(maps, go.Figure)
    err = tab_inside.quant_error(state, uniform("int4"), "1", 4, 0, user)
    assert (np.asarray(err.data[0].z) > 0).any()
    with pytest.raises(InputError, match="layer must be one of"):
        tab_inside.activations(state, "1", 4, 0, "down1")  # the U-Net's name, not this model's
    with pytest.raises(InputError, match="names no reference dataset"):
        tab_inside.saliency_panels(state, "1", 3, 0)  # no lafq.json dataset: no real image to take the saliency of


def test_a_folder_without_a_fisher_map_or_dataset_offers_fisher_free_plans_only(app_state, tiny_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare, ignore=shutil.ignore_patterns("fisher.safetensors", "lafq.json"))
    reg = Registry(app_state, discover({"LAFQ_MODELS": str(bare)}, shipped=()))
    user = reg.select(UserSession(), reg.ids[1])
    state = reg.state_for(user)
    assert state.fisher is None and "no Fisher map" in state.fisher_note
    assert state.classes == ("0", "1", "2") and not state.guided  # no lafq.json: every class embedding, no guidance
    heat, _, _ = tab_fisher.fisher_figures(state, "log", "all", "layers", 0, None, user)
    assert "No Fisher map" in heat.layout.title.text.replace("<br>", " ")
    edge = "INT4 with INT8 stem and head (the usual recipe)"  # no ranking: its first and last layers need no map
    assert set(tab_quantize.shown_presets(state)) == {UNIFORM_INT4, "uniform INT4-g32 (group-wise, 4.5 bits)", edge}
    md, _, _ = tab_quantize.readout(state, tab_quantize.preset_current(state), user)
    assert UNIFORM_INT4 in md
    plan = tab_quantize.resolve_plan(state, tab_quantize.preset_current(state, edge), user).precisions
    assert plan["conv_in.weight"] == plan["conv_out.weight"] == "int8" and "int4" in plan.values()
    budget = tab_quantize.policy_from_controls("budget", "int4", "mean", -2, -10, 0, 0, 0.25, 0, 8, False)
    with pytest.raises(InputError, match="no Fisher map for this model"):
        tab_quantize.readout(state, budget, user)
    *_, md = tab_compare.compare(state, uniform(), "any", 3.0, 2, 0, 1, False, user)
    assert "guidance 1 (no null class)" in md


def test_a_named_dataset_that_does_not_fit_the_model_leaves_it_without_a_map_not_broken(app_state, tiny_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other, ignore=shutil.ignore_patterns("fisher.safetensors"))
    (other / "lafq.json").write_text(json.dumps({"name": "odd", "dataset": "mnist-train5k"}))  # 28x28 for an 8x8 model
    reg = Registry(app_state, discover({"LAFQ_MODELS": str(other)}, shipped=()))
    state = reg.get(reg.ids[1])
    assert state.fisher is None and "none could be computed from mnist-train5k" in state.fisher_note


def test_the_mnist_session_is_unchanged_by_the_registry(models, app_state):
    state = models.state_for(UserSession())
    assert state is app_state and tab_compare.default_class(state) == "7"
    assert tab_fisher.model_controls(state)["groups"] == tab_fisher.GROUPS
    assert len(tab_quantize.shown_presets(state)) == len(PRESETS)
    assert torch.equal(state.images(state.model, tab_compare.SampleSpec(n=1, steps=1, seed=3)),
                       state.images(state.model, tab_compare.SampleSpec(n=1, steps=1, seed=3)))


# -- behind a real server ----------------------------------------------------------------------------

UNIFORM_INT8 = ["uniform", "int8", "final", -2, -10, 0, 0, 0.25, 0, 6, False]


def fp32_bytes(md: str) -> int:
    return int(md.split("FP32 is ")[1].split(" bytes")[0].replace(",", ""))


def test_two_sessions_keep_their_own_model_selection(models_url, app_state, tiny):
    pytest.importorskip("gradio_client")
    from gradio_client import Client
    from PIL import Image

    state, _ = tiny
    mnist, small = 4 * sum(p.numel() for p in app_state.model.parameters()), 4 * sum(p.numel() for p in state.model.parameters())
    a, b = Client(models_url, verbose=False), Client(models_url, verbose=False)
    assert "select_model" in str(a.view_api(print_info=False, return_format="dict")["named_endpoints"])
    a.predict(state.model_id, api_name="/select_model")
    assert fp32_bytes(a.predict(*UNIFORM_INT8, api_name="/quantize_readout")[0]) == small
    assert fp32_bytes(b.predict(*UNIFORM_INT8, api_name="/quantize_readout")[0]) == mnist  # the other user's view
    a_img, *_, a_md = a.predict("1", 1.5, 2, 0, 1, False, api_name="/compare")
    b_img, *_, b_md = b.predict("7", 2.0, 2, 0, 1, False, api_name="/compare")
    assert state.title in a_md and state.title not in b_md
    assert Image.open(a_img).size != Image.open(b_img).size  # 8x8 samples vs 28x28 digits
    b.predict(state.model_id, api_name="/select_model")  # b follows later; a switches back: each its own
    a.predict(DEFAULT_MODEL, api_name="/select_model")
    assert fp32_bytes(a.predict(*UNIFORM_INT8, api_name="/quantize_readout")[0]) == mnist
    assert fp32_bytes(b.predict(*UNIFORM_INT8, api_name="/quantize_readout")[0]) == small


def test_an_unknown_model_id_is_refused_in_one_line_and_the_session_keeps_its_model(models_url, app_state):
    pytest.importorskip("gradio_client")
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    c = Client(models_url, verbose=False)
    with pytest.raises(AppError, match="model must be one of"):
        c.predict("x" * 10_000, api_name="/select_model")
    assert fp32_bytes(c.predict(*UNIFORM_INT8, api_name="/quantize_readout")[0]) == \
        4 * sum(p.numel() for p in app_state.model.parameters())


def test_a_model_with_a_dataset_and_classifier_gets_a_quick_map_on_load_and_a_paired_fid(app_state, tmp_path):
    """A stand-in for checkpoints/fashion at 28x28 (MNIST files stand in for Fashion-MNIST: both are offline here)."""
    from diffusers import UNet2DModel

    from lafq.classifier import ClassifierConfig, MnistClassifier, save_classifier
    from tests.diffusers_tiny import save_pipeline_dir

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=2, num_class_embeds=11).eval()
    folder = save_pipeline_dir(tmp_path / "fashion-like", unet)
    (folder / "model_index.json").unlink()
    info = {"name": "Fashion stand-in", "dataset": "mnist-train5k", "reference": "mnist-train5k",
            "classes": [f"c{i}" for i in range(10)], "null_class": 10, "guidance": 1.5}
    (folder / "lafq.json").write_text(json.dumps(info))
    save_classifier(folder / "classifier.safetensors", MnistClassifier(ClassifierConfig(width=4, feature_dim=8)))
    reg = Registry(app_state, discover({}, shipped=(("fashion", folder),)))
    user = reg.select(UserSession(), "fashion")
    state = reg.state_for(user)
    assert state.fisher is not None and "rough 4-bin x 4-sample map from mnist-train5k" in state.fisher_note
    md, fig, mine = tab_quality.evaluate(state, uniform("int8"), 20, 2, 2, True, user=user)
    assert "FP32 at N=20 × 2 seeds" in md.splitlines()[0] and "paired ΔFID" in md and "reference=mnist-train5k" in md
    assert "Real-vs-real floor at this backend and N" in md and "class agreement" in md
    assert {p.model for p in mine.evaluations} == {"fashion"}
    assert [a.text.startswith("your evaluations") for a in fig.layout.annotations] == [True]  # no MNIST report panel
    assert list((folder / "stats").glob("mnist-train5k-classifier-*.npz"))  # reference statistics cached in the folder
    mnist_fig = tab_quality.pareto_figure(app_state, mine, 20, 2)
    assert any("press Evaluate" in a.text for a in mnist_fig.layout.annotations)  # no Fashion evaluations on it
    new, msg = tab_fisher.recompute(state, 2, 2, False, user=user)
    assert new.fisher.bins == 2 and new.model == "fashion" and "2 bins x 2 samples" in msg
    assert new.fisher.meta["p_null"] == 0.1 and "each image's conditioning row" in new.fisher.meta["loss"]
    per, msg = tab_fisher.recompute(state, 2, 1, True, user=user)  # per-class maps: any class-conditional model
    assert per.fisher.groups == ["all"] + [str(c) for c in range(10)] and "per class" in msg
    heat, _, _ = tab_fisher.fisher_figures(state, "log", "3", "layers", 0, "conv_in", per)
    assert heat.data[0].z is not None


def test_the_shipped_fashion_model_is_listed_second_and_compares_with_its_own_classes_and_fisher_map(app_state):
    from demo.models import FASHION

    if not (FASHION / "lafq.json").is_file():
        pytest.skip("checkpoints/fashion is not in this checkout")
    models = Registry(app_state, discover({}))
    assert models.ids[:2] == [DEFAULT_MODEL, "fashion"]
    user = models.select(UserSession(), "fashion")
    state = models.state_for(user)
    assert state.fisher is not None and state.has_classifier and state.classifier() is not None
    assert tab_compare.class_choices(state)[1] == ("T-shirt/top", "0")
    fp32, plan, _, _, md = tab_compare.compare(state, uniform("int8"), "9", 1.5, 2, 0, 1, False, user)
    assert fp32.shape == plan.shape and "Fashion-MNIST" in md
    sal = tab_inside.saliency_panels(state, "9", 300, 0)  # fashion-test is not vendored: its training subset is
    assert isinstance(sal, go.Figure) and len(sal.data) == 4


def test_the_shipped_dit_is_listed_third_and_compares_and_looks_inside_on_its_own_transformer_layers(app_state):
    from demo.models import DIT

    if not (DIT / "lafq.json").is_file():
        pytest.skip("checkpoints/dit is not in this checkout")
    models = Registry(app_state, discover({}))
    assert models.ids[:3] == [DEFAULT_MODEL, "fashion", "dit"]
    user = models.select(UserSession(), "dit")
    state = models.state_for(user)
    assert state.fisher is not None and state.has_classifier
    assert tab_compare.class_choices(state)[1] == ("T-shirt/top", "0")
    fp32, plan, _, _, md = tab_compare.compare(state, uniform("int8"), "9", 1.5, 2, 0, 1, False, user)
    assert fp32.shape == plan.shape and "DiT" in md
    sal = tab_inside.saliency_panels(state, "9", 300, 0)
    assert isinstance(sal, go.Figure) and len(sal.data) == 4


def test_a_switch_says_when_the_users_own_plan_was_reset_and_is_silent_otherwise(app_state, tiny):
    from demo.ui import switch_note

    other, _ = tiny
    assert switch_note(app_state, other, uniform("int8")).startswith("**Your plan was reset:** it was made for MNIST")
    assert "reset" not in switch_note(app_state, other, tab_quantize.preset_current(app_state))
    assert switch_note(other, app_state, tab_quantize.preset_current(other)) == ""  # back to the U-Net: nothing to say


@pytest.mark.parametrize("which", ["lafq-UNet", "diffusers-UNet2DModel"])
def test_one_seed_gives_the_same_images_in_the_app_the_cli_and_the_report(which, app_state, tiny, tmp_path, capsys):
    """One sampling function and one noise rule (lafq.pipeline.generate) for every model: the app's handler,
    `python -m lafq sample` and the report's evaluator draw the same images from the same seed, batch after batch."""
    from lafq.checkpoint import save_unet
    from lafq.cli import main
    from lafq.evaluate import Evaluator
    from lafq.pipeline import SampleSpec
    from lafq.train import save_grid

    if which == "lafq-UNet":
        state = app_state
        save_unet(tmp_path / "unet.safetensors", state.model)
        source = ["--checkpoint", str(tmp_path / "unet.safetensors")]
    else:
        state, _ = tiny
        source = ["--model", str(state.folder)]
    spec = SampleSpec(n=6, steps=3, seed=5, guidance=1.5, batch_size=4)
    app = state.images(state.model, spec)
    assert main(["sample", *source, "--n", "6", "--steps", "3", "--seed", "5", "--guidance", "1.5", "--batch-size",
                 "4", "--nrow", "3", "--device", "cpu", "--out", str(tmp_path / "cli.png"), "--json"]) == 0
    capsys.readouterr()
    save_grid(app.float() / 127.5 - 1, tmp_path / "app.png", nrow=3)
    assert (tmp_path / "cli.png").read_bytes() == (tmp_path / "app.png").read_bytes()
    report = Evaluator(state.denoiser(state.model), None, None, tmp_path / "cache").fp32_images(spec)
    assert torch.equal(report, app)
    assert not torch.equal(app, state.images(state.model, SampleSpec(n=6, steps=3, seed=6, guidance=1.5, batch_size=4)))


def test_the_sensitivity_chart_is_the_selected_models_own_where_its_report_has_one(tiny, tmp_path, monkeypatch):
    import dataclasses

    from demo.state import SENSITIVITY_CSV

    state, _ = tiny
    read = []
    monkeypatch.setattr(tab_quality, "sensitivity_data", lambda path: read.append(path) or {})
    tab_quality.sensitivity_figure("fisher_x_error", state=state)  # none of its own: the shipped U-Net's, said so
    assert "the MNIST U-Net's" in tab_quality.model_note(dataclasses.replace(state, folder=paths.CHECKPOINTS))
    own = tmp_path / "report"
    own.mkdir()
    (own / "sensitivity.csv").write_text("unit,seed\n")
    mine = dataclasses.replace(state, report_dir=own)
    tab_quality.sensitivity_figure("fisher_x_error", state=mine)
    assert read == [SENSITIVITY_CSV, own / "sensitivity.csv"] and mine.own_sensitivity


def test_the_shipped_unet_loads_through_the_one_loader_with_its_card_files_and_report():
    from demo.state import load_state

    state = load_state(device="cpu")
    assert (state.title, state.default_guidance, state.default_class, state.guided) == ("MNIST U-Net (lafq)", 1.5, "7", True)
    assert state.classes == tuple(str(d) for d in range(10)) and state.shipped_map
    assert state.fisher_note.startswith("shipped map: 50 bins x 16 samples, groups: all + per class")
    assert state.report_dir == paths.DOCS and state.report_csv == paths.DOCS / "report.csv" and state.own_sensitivity
    assert state.folder == paths.CHECKPOINTS and state.stats_dir == paths.STATS and state.has_classifier
    assert (state.reference, state.floor_images, state.fisher_dataset) == ("mnist-train5k", "mnist-test10k", "mnist-test10k")


def test_a_model_switch_shows_inside_views_only_once_computed(tiny):
    state, _ = tiny
    assert tab_inside.shown_example(state) == (None, None, None, None)  # a switch must not wait for the traces
    views = tab_inside.example(state)  # what opening the tab computes, once
    assert tab_inside.shown_example(state) is views and isinstance(views[0], go.Figure)
