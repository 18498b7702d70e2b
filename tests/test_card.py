"""One ModelCard for a folder's lafq.json: the same validation and the same one-line refusals in the CLI, the app
and what train-diffusers writes."""
import json

import pytest

from lafq.card import ModelCard
from lafq.cli import main
from lafq.train_diffusers import model_card


@pytest.mark.parametrize("data, message", [
    ([1], "must hold an object, got list"),
    ({"classes": None}, "classes must be a list"),
    ({"classes": 5}, "classes must be a list"),
    ({"classes": ["<b>a</b>"]}, "class names must be plain text"),
    ({"null_class": True}, "null_class must be an index"),
    ({"classes": ["a", "b"], "null_class": 1}, "null_class must be an index after the 2 classes"),
    ({"guidance": "strong"}, "guidance must be a number in [0, 10]"),
    ({"guidance": 2.0}, "guidance other than 1 needs null_class"),
    ({"dataset": ""}, "dataset must be a dataset name"),
])
def test_a_card_that_breaks_a_rule_is_refused_in_one_line_naming_the_file(tmp_path, data, message):
    (tmp_path / "lafq.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        ModelCard.read(tmp_path)
    assert message in str(e.value) and str(e.value).startswith(str(tmp_path / "lafq.json"))
    assert "\n" not in str(e.value)


def test_a_folder_without_a_card_gets_the_defaults_and_a_command_says_what_it_lacks(tmp_path):
    card = ModelCard.read(tmp_path)
    assert card == ModelCard() and card.guidance == 1.0
    with pytest.raises(ValueError, match=r"lafq.json lacks dataset, reference \(written by train-diffusers"):
        card.require("dataset", "reference", folder=tmp_path)


def test_what_train_diffusers_writes_reads_back_as_the_same_card_with_its_training_facts():
    written = model_card("fashion-train", 10, train={"steps": 3})
    card = ModelCard.from_dict(written)
    assert card.to_dict() == written and card.extra == {"train": {"steps": 3}}
    assert card.classes[0] == "T-shirt/top" and card.null_class == 10 and card.reference


@pytest.mark.parametrize("command", ["fid --model {m}", "sample --model {m} --out {o}",
                                     "report --model {m} --out-dir {o}"])
def test_a_folder_command_with_a_card_that_is_not_an_object_says_so_in_one_line(tmp_path, capsys, command):
    model = tmp_path / "model"
    model.mkdir()
    (model / "lafq.json").write_text("[1]")
    code = main(command.format(m=model, o=tmp_path / "out").split())
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {model / 'lafq.json'} must hold an object, got list", err
