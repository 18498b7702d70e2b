"""A model folder's `lafq.json`: one `ModelCard` for the CLI, the app and `train-diffusers`.

Contracts:
- `ModelCard` is frozen and validated: every field has a type and a range, class names are plain text (no
  markup: the app shows them), `guidance` other than 1 needs `null_class`. Unknown keys (e.g. `train`, the
  training facts) are kept in `extra` and written back unchanged.
- `ModelCard.read(folder)` reads at most MAX_JSON_BYTES of a regular file (no symlink loop, no device) and
  refuses anything else in one line (a ValueError naming the file and what was wrong): a JSON that is not an
  object, a field of the wrong type, nesting too deep. A folder without the file gets the defaults.
- `card.require(*keys)` refuses in one line a card that lacks what a command needs (FID needs `dataset` and
  `reference`; guidance needs `null_class`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

CARD_FILE = "lafq.json"
MAX_JSON_BYTES = 1 << 20
MAX_CLASSES = 1_000
MAX_NAME = 80
ECHO = 40  # characters of a rejected value quoted back
PLAIN_TEXT = re.compile(r"[^\w .,:;()/+'-]+")  # what a shown name keeps: no HTML, no links or headings


def quoted(value) -> str:
    """A rejected value as a message quotes it: its repr, cut to ECHO characters."""
    r = repr(value)
    return r if len(r) <= ECHO else f"{r[:ECHO]}… ({len(r):,} characters)"


def plain_name(text: str, default: str = "model") -> str:
    """A name safe to show anywhere (Markdown, HTML, a dropdown): word characters, spaces and . , : ; ( ) / + ' -,
    whitespace folded, at most MAX_NAME characters."""
    text = " ".join(PLAIN_TEXT.sub(" ", str(text)).split())[:MAX_NAME].strip()
    return text or default


def read_json(path: Path, what: str):
    """A small JSON file's value; ValueError (one line) for anything else: too large, not a regular file,
    undecodable, nested too deep."""
    path = Path(path)
    if path.is_symlink() and not path.exists() or path.exists() and not path.is_file():
        raise ValueError(f"{what} is not a regular file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{what} has {size:,} bytes; at most {MAX_JSON_BYTES:,} are read")
    try:
        return json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{what} is not readable JSON ({type(e).__name__})") from None


@dataclass(frozen=True)
class ModelCard:
    """A model folder's `lafq.json` (every key optional). `classes` are the class names in index order;
    `null_class` the unconditional (classifier-free guidance) index, if trained with one; `dataset` the images
    it was trained on (Fisher maps, the real-vs-real floor) and `reference` the split FID compares against."""
    name: str = ""
    dataset: str | None = None
    reference: str | None = None
    classes: tuple[str, ...] = ()
    null_class: int | None = None
    guidance: float = 1.0
    example_class: str | None = None  # the class the app shows first (one of `classes`)
    extra: dict = field(default_factory=dict, compare=False)  # other keys, kept as they were (e.g. "train")

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {quoted(self.name)}")
        for key in ("dataset", "reference"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{key} must be a dataset name, got {quoted(v)}")
        if not isinstance(self.classes, (list, tuple)) or not all(isinstance(c, str) and c for c in self.classes) \
                or len(self.classes) > MAX_CLASSES:
            raise ValueError(f"classes must be a list of up to {MAX_CLASSES:,} names, got {quoted(self.classes)}")
        if any(plain_name(c, "") != c for c in self.classes):
            bad = next(c for c in self.classes if plain_name(c, "") != c)
            raise ValueError(f"class names must be plain text (letters, digits, spaces and .,:;()/+'-, at most "
                             f"{MAX_NAME} characters), got {quoted(bad)}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.null_class is not None and (isinstance(self.null_class, bool) or not isinstance(self.null_class, int)
                                            or self.null_class < len(self.classes)):
            raise ValueError(f"null_class must be an index after the {len(self.classes)} classes, "
                             f"got {quoted(self.null_class)}")
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 <= g <= 10:
            raise ValueError(f"guidance must be a number in [0, 10], got {quoted(g)}")
        object.__setattr__(self, "guidance", float(g))
        if self.guidance != 1.0 and self.null_class is None:
            raise ValueError("guidance other than 1 needs null_class (the unconditional class index)")
        if self.example_class is not None and self.example_class not in self.classes:
            raise ValueError(f"example_class must be one of the classes, got {quoted(self.example_class)}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be an object, got {quoted(self.extra)}")

    @classmethod
    def from_dict(cls, data, what: str = CARD_FILE) -> "ModelCard":
        if not isinstance(data, dict):
            raise ValueError(f"{what} must hold an object, got {type(data).__name__}")
        known = {k for k in cls.__dataclass_fields__ if k != "extra"}
        try:
            return cls(**{k: v for k, v in data.items() if k in known},
                       extra={k: v for k, v in data.items() if k not in known})
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None

    @classmethod
    def read(cls, folder: Path) -> "ModelCard":
        """The folder's lafq.json, or defaults when it has none; ValueError (one line) when it is invalid."""
        path = Path(folder) / CARD_FILE
        if not (path.exists() or path.is_symlink()):
            return cls()
        return cls.from_dict(read_json(path, str(path)), str(path))

    def to_dict(self) -> dict:
        return {"name": self.name, "dataset": self.dataset, "reference": self.reference,
                "classes": list(self.classes), "null_class": self.null_class, "guidance": self.guidance,
                **({"example_class": self.example_class} if self.example_class is not None else {}), **self.extra}

    def require(self, *keys: str, folder: Path | str = "") -> "ModelCard":
        """This card, or a one-line ValueError naming the keys a command needs that it lacks."""
        missing = [k for k in keys if getattr(self, k) in (None, "", ())]
        if missing:
            where = f"{Path(folder) / CARD_FILE}" if folder else CARD_FILE
            raise ValueError(f"{where} lacks {', '.join(missing)} (written by train-diffusers; see docs for the keys)")
        return self


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DIGITS = tuple(str(i) for i in range(10))

# What lafq.json says about a model trained on each dataset: the data's title, the split FID compares against,
# and the class names (label i is classes[i]).
DATASET_CARDS = {
    "fashion-train": {"title": "Fashion-MNIST", "reference": "fashion-test", "classes": FASHION_CLASSES},
    "fashion-train5k": {"title": "Fashion-MNIST", "reference": "fashion-test", "classes": FASHION_CLASSES},
    "fashion-test": {"title": "Fashion-MNIST", "reference": "fashion-train", "classes": FASHION_CLASSES},
    "mnist-test10k": {"title": "MNIST", "reference": "mnist-train5k", "classes": DIGITS},
    "mnist-train": {"title": "MNIST", "reference": "mnist-test10k", "classes": DIGITS},
}


def model_card(dataset: str, null_class: int | None, train: dict | None = None,
               kind: str = "UNet2DModel (diffusers)") -> dict:
    """The lafq.json a trainer writes beside what it trained (validated as a ModelCard): name, dataset, reference,
    classes, null_class, guidance, and the training facts under "train". `kind` names the model in its name;
    `null_class` None: an unconditional model (no classes, no guidance)."""
    from .diffusion import DEFAULT_GUIDANCE

    known = DATASET_CARDS.get(dataset, {"title": dataset, "reference": None,
                                        "classes": tuple(str(i) for i in range(null_class or 0))})
    card = ModelCard(name=f"{known['title']} {kind}", dataset=dataset, reference=known["reference"],
                     classes=tuple(known["classes"]) if null_class is not None else (), null_class=null_class,
                     guidance=DEFAULT_GUIDANCE if null_class is not None else 1.0,
                     extra={} if train is None else {"train": train})
    return card.to_dict()
