"""`python -m lafq space build|push`: the app as a self-contained Hugging Face Space, and its upload.

Contracts:
- `build(out, hardware)` writes a folder that boots with `python app.py` and nothing else from this repo:
  `app.py`, `demo/*.py`, `lafq/*.py`, exactly the checkpoints, reference statistics and data the app reads
  (`APP_FILES`, and the Fashion-MNIST model's folder where the project has it: `OPTIONAL_APP_FILES`), a `requirements.txt` for that hardware, a `README.md` whose front matter the Hub reads, and a
  `.gitattributes` that stores every binary file (and anything over 10 MB) through LFS/Xet. It is assembled
  in a temporary sibling folder and renamed into place, so OUT is either the old folder or the complete new
  one; an existing non-empty OUT is replaced only with `force=True`.
- Hardware kinds (`HARDWARE`): `cpu-basic` keeps the project's pins and Python 3.11; `zero-gpu` pins a
  torch/torchvision pair and a Python that ZeroGPU supports and adds the `spaces` package (the app then runs
  its GPU work in `@spaces.GPU` functions, see demo/zerogpu.py).
- Nothing here touches the network except `push`, which goes through huggingface_hub (`create_repo` +
  `upload_folder`, which stores binaries through Xet/LFS itself). Every failure is a `SpaceError` whose
  message is one line saying what was wrong and what is accepted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cliutil import emit as _emit

REPO = Path(__file__).resolve().parent.parent

# What the app reads at run time, relative to the repo (demo/state.py, lafq/metrics.py, lafq/data.py):
# the model, its Fisher map, the FID classifier and its cached reference statistics, the MNIST files behind
# Fisher recompute and saliency, the report and sensitivity rows behind the Quality charts. Not the training
# state, the evaluation logs or the tests.
APP_FILES = (
    "app.py",
    "checkpoints/unet.safetensors",
    "checkpoints/fisher.safetensors",
    "checkpoints/classifier.safetensors",
    "checkpoints/lafq.json",
    "checkpoints/stats/mnist-train5k-classifier-d79f1c468f84e98f.npz",
    "data/README.md",
    "data/mnist/t10k-images-idx3-ubyte.gz",
    "data/mnist/t10k-labels-idx1-ubyte.gz",
    "data/mnist/mnist_train_subset_5k.npz",
    "docs/report.csv",
    "docs/sensitivity.csv",
)
# The shipped Fashion-MNIST diffusers models, a U-Net and a DiT (demo/models.py lists them in the app's model
# selector), copied when the project has them: its weights and scheduler, lafq.json, Fisher map, classifier and FID statistics, and
# the vendored Fashion-MNIST images behind its Fisher recompute and real-vs-real floor.
OPTIONAL_APP_FILES = tuple(f"checkpoints/{m}/{f}" for m in ("fashion", "dit")
                           for f in ("unet/*", "transformer/*", "scheduler/*", "lafq.json", "fisher.safetensors",
                                     "classifier.safetensors", "stats/*")) + ("data/fashion/*",)
PACKAGES = ("demo", "lafq")  # copied as their *.py files, subpackages (lafq/models) included


def optional_app_files(repo: Path = REPO) -> list[str]:
    """The OPTIONAL_APP_FILES patterns' files that exist in `repo`, relative to it."""
    return sorted({p.relative_to(repo).as_posix() for g in OPTIONAL_APP_FILES for p in repo.glob(g) if p.is_file()})

# ZeroGPU runs a few PyTorch/Python pairs only (its docs list PyTorch 2.8-2.11 with Python 3.10.13 or
# 3.12.12); the library uses nothing newer than torch 2.9 (torch.func, torch.compile, flop_counter).
ZEROGPU_TORCH = {"torch": "2.9.1", "torchvision": "0.24.1"}
SPACES_PIN = "spaces==0.51.3"


@dataclass(frozen=True)
class Hardware:
    name: str
    suggested: str  # the Hub's hardware flavour (huggingface_hub.SpaceHardware)
    python: str
    pins: dict  # requirement name -> version replacing the project's pin
    extra: tuple  # requirement lines added
    startup: str  # what the README says a cold Space costs


HARDWARE = {
    "cpu-basic": Hardware("cpu-basic", "cpu-basic", "3.11", {}, (),
                          "2 vCPU, 16 GB: the app computes on the CPU (the Compare tab's default job: 1.4 s on 2 idle cores)"),
    "zero-gpu": Hardware("zero-gpu", "zero-a10g", "3.12.12", ZEROGPU_TORCH, (SPACES_PIN,),
                         "a GPU slice is attached to each GPU job: sampling, FID, Fisher recompute and the "
                         "Inside traces wait for one, the rest of the app runs on the CPU"),
}

LFS_SIZE_LIMIT = 10 * 1024 * 1024  # the Hub refuses larger plain files whatever their kind
BINARY_PATTERNS = ("*.safetensors", "*.npz", "*.gz", "*.png", "*.jpg", "*.jpeg", "*.pt", "*.bin", "*.zip")
SHORT_DESCRIPTION = "Fisher-guided quantization of an MNIST diffusion U-Net"  # the Hub allows 60 characters
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class SpaceError(ValueError):
    """A Space could not be built or pushed; the message is one line."""


def is_binary(path: Path) -> bool:
    """Git's own test: a NUL byte in the first 8,000 bytes."""
    with open(path, "rb") as f:
        return b"\0" in f.read(8000)


def project_pins(requirements: Path = REPO / "requirements.txt") -> list[tuple[str, str]]:
    """(name, line) for each requirement line of the project, comments dropped."""
    out = []
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append((re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0].lower(), line))
    return out


def requirements_for(hw: Hardware, requirements: Path = REPO / "requirements.txt") -> str:
    lines = [f"# The LAFQ app on Hugging Face Spaces, {hw.name}. Generated by `python -m lafq space build`."]
    if hw.pins:
        lines.append("# torch/torchvision: a pair ZeroGPU supports (the project itself pins newer ones).")
    for name, line in project_pins(requirements):
        lines.append(f"{name}=={hw.pins[name]}" if name in hw.pins else line)
    lines += list(hw.extra)
    return "\n".join(lines) + "\n"


def sdk_version(requirements: Path = REPO / "requirements.txt") -> str:
    for name, line in project_pins(requirements):
        if name == "gradio" and "==" in line:
            return line.split("==", 1)[1].strip()
    raise SpaceError(f"{requirements} pins no gradio version (gradio==X.Y.Z); the Space's sdk_version comes from it")


def front_matter(hw: Hardware, license: str, requirements: Path = REPO / "requirements.txt") -> dict:
    return {"title": "LAFQ", "emoji": "🔬", "colorFrom": "indigo", "colorTo": "green", "sdk": "gradio",
            "sdk_version": sdk_version(requirements), "python_version": hw.python, "app_file": "app.py",
            "short_description": SHORT_DESCRIPTION, "suggested_hardware": hw.suggested, "license": license,
            "pinned": False}


def readme_for(hw: Hardware, license: str) -> str:
    # JSON scalars are valid YAML: no YAML writer needed, and every value is quoted exactly.
    meta = "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in front_matter(hw, license).items())
    return f"""---
{meta}
---

# LAFQ — layer-adaptive, Fisher-guided quantization

See where precision matters in a class-conditional MNIST diffusion U-Net (828,641 parameters) and, where this
folder holds them, a Fashion-MNIST diffusers U-Net and DiT (a model selector above the tabs), tune a
quantization plan (FP32 / FP16 / BF16 / INT8 / INT4 per weight tensor) and measure what it costs: size,
samples from identical noise, FID with its interval and classifier accuracy, and what happens inside the
network along a trajectory.

Hardware: `{hw.suggested}` ({hw.startup}). Everything the app needs ships in this folder (model, Fisher map,
classifier and FID reference statistics in `checkpoints/`, MNIST in `data/`, see `data/README.md`); it reads
nothing from the network at start.

Built with `python -m lafq space build OUT --hardware {hw.name}` from the LAFQ project.
"""


def gitattributes_for(files: list[Path], root: Path) -> str:
    """LFS for the usual binary extensions, plus any other binary or oversized file by its path."""
    lines = [f"{p} filter=lfs diff=lfs merge=lfs -text" for p in BINARY_PATTERNS]
    patterns = tuple(p[1:] for p in BINARY_PATTERNS)
    for f in files:
        rel = f.relative_to(root).as_posix()
        if not rel.endswith(patterns) and (is_binary(f) or f.stat().st_size > LFS_SIZE_LIMIT):
            lines.append(f"/{rel} filter=lfs diff=lfs merge=lfs -text")
    return "# Stored through LFS/Xet: the Hub refuses binary files in plain git.\n" + "\n".join(lines) + "\n"


@dataclass
class BuildResult:
    out: Path
    hardware: str
    files: int
    bytes: int
    largest: list  # (path, bytes), largest first
    lfs: list  # paths stored through LFS/Xet

    def to_dict(self) -> dict:
        return {"out": str(self.out), "hardware": self.hardware, "files": self.files, "bytes": self.bytes,
                "largest": [[p, b] for p, b in self.largest], "lfs": self.lfs}

    def describe(self) -> str:
        big = ", ".join(f"{p} {b / 1e6:.1f} MB" for p, b in self.largest[:3])
        return (f"wrote {self.out}: Space for {self.hardware}, {self.files} files, {self.bytes / 1e6:.1f} MB "
                f"({len(self.lfs)} through LFS/Xet; largest: {big})")


def _lfs_paths(root: Path, files: list[Path]) -> list[str]:
    patterns = tuple(p[1:] for p in BINARY_PATTERNS)
    return sorted(f.relative_to(root).as_posix() for f in files
                  if f.name.endswith(patterns) or is_binary(f) or f.stat().st_size > LFS_SIZE_LIMIT)


def build(out, hardware: str = "cpu-basic", *, license: str = "other", force: bool = False,
          repo: Path = REPO) -> BuildResult:
    if hardware not in HARDWARE:
        raise SpaceError(f"unknown hardware {hardware!r}; choose one of {', '.join(HARDWARE)}")
    hw = HARDWARE[hardware]
    out = Path(out).resolve()
    if out == repo or out in repo.parents:
        raise SpaceError(f"OUT {out} would replace the project itself; choose another folder (e.g. /tmp/lafq-space)")
    missing = [f for f in APP_FILES if not (repo / f).is_file()]
    if missing:
        raise SpaceError(f"the project lacks {', '.join(missing)}, which the app reads; restore them (git checkout -- PATH)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
    except OSError as e:
        raise SpaceError(f"cannot write beside {out}: {e.strerror}; choose a folder you can write to") from None
    try:
        _recover(out)  # first: a build killed mid-swap had moved the old OUT aside
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
            raise SpaceError(f"{out} exists and is not an empty folder; pass --force to replace it, or choose "
                             "another OUT")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{BUILD_TAG}", dir=out.parent))
        except OSError as e:
            raise SpaceError(f"cannot write beside {out}: {e.strerror}; choose a folder you can write to") from None
        return _assemble(out, tmp, hw, hardware, license, repo)
    finally:
        os.close(lock)  # releases the lock


def _assemble(out: Path, tmp: Path, hw, hardware: str, license: str, repo: Path) -> BuildResult:
    try:
        sources = [repo / f for f in (*APP_FILES, *optional_app_files(repo))]
        for pkg in PACKAGES:
            sources += sorted(p for p in (repo / pkg).rglob("*.py") if "__pycache__" not in p.parts)
        for src in sources:
            dst = tmp / src.relative_to(repo)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        (tmp / "requirements.txt").write_text(requirements_for(hw, repo / "requirements.txt"))
        (tmp / "README.md").write_text(readme_for(hw, license))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        (tmp / ".gitattributes").write_text(gitattributes_for(files, tmp))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sizes = sorted(((p.relative_to(tmp).as_posix(), p.stat().st_size) for p in files), key=lambda x: -x[1])
        lfs = _lfs_paths(tmp, files)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{OLD_TAG}", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(out, hardware, len(files), sum(b for _, b in sizes), sizes[:5], lfs)


BUILD_TAG, OLD_TAG = "lafq-build-", "lafq-old-"  # the names of a build's temporary folders beside OUT


def _lock(out: Path) -> int:
    """An exclusive lock on OUT's parent folder (flock on the folder itself: no lock file left behind), so that
    `_recover` never touches a running build's folders; a second build there at the same time is refused."""
    import fcntl

    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpaceError(f"another `space build` into {out.parent} is running; wait for it or choose another "
                         "folder") from None
    return fd


def _recover(out: Path) -> None:
    """Undo what a build killed mid-way left beside OUT: the old OUT moved aside but the new one not yet in its
    place (moved back, the newest if there are several), and half-built or old copies (deleted). Only folders
    with a build's own names (BUILD_TAG, OLD_TAG) are touched."""
    import glob

    name = glob.escape(out.name)
    olds = sorted(out.parent.glob(f".{name}.{OLD_TAG}*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds:
        aside = old / "x"
        if not (out.exists() or out.is_symlink()) and (aside.exists() or aside.is_symlink()):
            os.replace(aside, out)  # a folder, or a file an earlier --force replaced
        shutil.rmtree(old, ignore_errors=True)
    for tmp in out.parent.glob(f".{name}.{BUILD_TAG}*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def read_front_matter(folder: Path) -> dict:
    """The README's front matter as a dict; a SpaceError if there is none."""
    import yaml

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        raise SpaceError(f"{folder} has no README.md; build the folder first with `python -m lafq space build {folder}`")
    text = readme.read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not m:
        raise SpaceError(f"{readme} has no front matter (a '---' block at the top); rebuild the folder")
    meta = yaml.safe_load(m.group(1))
    if not isinstance(meta, dict):
        raise SpaceError(f"{readme}: the front matter is not a mapping; rebuild the folder")
    return meta


def push(folder, repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """Create the Space (if it is not there) and upload the folder; returns the Space's URL."""
    folder = Path(folder)
    if not REPO_ID.match(repo_id or ""):
        raise SpaceError(f"--repo must look like user/name (letters, digits, '.', '_', '-'), got {repo_id!r}")
    meta = read_front_matter(folder)
    if meta.get("sdk") != "gradio" or not (folder / str(meta.get("app_file", ""))).is_file():
        raise SpaceError(f"{folder} is not a built Gradio Space (sdk: gradio and its app_file); rebuild it with "
                         "`python -m lafq space build`")
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise SpaceError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(token=token)
    hardware = meta.get("suggested_hardware")
    try:
        url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True, private=private,
                              space_hardware=hardware)
        api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=str(folder),
                          commit_message=f"LAFQ app ({hardware})")
    except HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpaceError(f"the Hub refused the push to {repo_id}: {first}") from None
    except (OSError, ConnectionError) as e:
        raise SpaceError(f"cannot reach the Hugging Face Hub ({_endpoint()}): {type(e).__name__}; "
                         "check the network, or HF_ENDPOINT") from None
    except Exception as e:  # httpx's transport errors are not OSErrors; keep the message to one line
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise SpaceError(f"cannot reach the Hugging Face Hub ({_endpoint()}): {type(e).__name__}; "
                             "check the network, or HF_ENDPOINT") from None
        raise
    return str(url)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def cmd_build(args):
    r = build(args.out, args.hardware, license=args.license, force=args.force)
    _emit(args, {"command": "space build", **r.to_dict()}, r.describe())


def cmd_push(args):
    url = push(args.out, args.repo, private=args.private)
    _emit(args, {"command": "space push", "repo": args.repo, "url": url}, f"pushed {args.out} to {url}")


def register(sub):
    s = sub.add_parser("space", help="build a Hugging Face Space folder of the app, or push one")
    ss = s.add_subparsers(dest="space_command", required=True, metavar="ACTION")
    b = ss.add_parser("build", help="write a self-contained Space folder (app, library, the checkpoints it reads)")
    b.add_argument("out", type=Path, help="the folder to write (absent or empty; --force replaces it)")
    b.add_argument("--hardware", choices=tuple(HARDWARE), default="cpu-basic")
    b.add_argument("--license", default="other", help="the Space's license id on the Hub (default: other)")
    b.add_argument("--force", action="store_true", help="replace OUT if it holds files")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_build)
    p = ss.add_parser("push", help="create the Space and upload a built folder (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("out", type=Path, help="a folder written by `space build`")
    p.add_argument("--repo", required=True, help="the Space's id, user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_push)


REGISTER = [register]
