"""An interpreter that sees only what a requirements file installs: a fresh venv's view, without installing.

`view(requirements, folder)` links every installed distribution in the requirements' dependency closure
(markers evaluated, extras followed) into `folder`; `python -S` with `PYTHONPATH=folder` (`env()`, `python()`)
then imports only those packages, and `importlib.metadata` finds only them. A package that the code imports but
the requirements do not install (diffusers beside a requirements.txt without it, say) is a ModuleNotFoundError
there, as on a fresh machine, while this machine's other packages stay invisible.

What it does not check: versions (names are resolved against what is installed here, so a Space's torch==2.9.1
pin is checked as "torch"), and packages that the requirements name but this machine lacks (`missing`).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def read_requirements(path: Path) -> list[Requirement]:
    """The requirement lines of a pip requirements file, following `-r other.txt`."""
    out: list[Requirement] = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r"):
            out += read_requirements(Path(path).parent / line[2:].strip())
        else:
            out.append(Requirement(line))
    return out


@dataclass(frozen=True)
class View:
    folder: Path
    names: frozenset[str]  # canonical names of the linked distributions
    missing: frozenset[str]  # required here but not installed on this machine

    def env(self, base: dict | None = None) -> dict:
        env = {k: v for k, v in (os.environ if base is None else base).items() if k != "PYTHONPATH"}
        return {**env, "PYTHONPATH": str(self.folder), "PYTHONNOUSERSITE": "1"}

    @staticmethod
    def python() -> list[str]:
        """The interpreter without site-packages (-S): only PYTHONPATH, the script's folder and the stdlib."""
        return [sys.executable, "-S"]


def closure(requirements: list[Requirement]) -> tuple[dict[str, md.Distribution], set[str]]:
    found: dict[str, md.Distribution] = {}
    extras_seen: dict[str, set[str]] = {}
    missing: set[str] = set()
    todo = [(r, set(r.extras)) for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in found and extras <= extras_seen[name]:
            continue
        try:
            dist = found.get(name) or md.distribution(req.name)
        except md.PackageNotFoundError:
            missing.add(name)
            continue
        found[name] = dist
        extras_seen[name] = extras_seen.get(name, set()) | extras
        for line in dist.requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((dep, set(dep.extras)))
    return found, missing


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.symlink_to(src, target_is_directory=src.is_dir())


def view(requirements: Path, folder: Path) -> View:
    """Link the closure of `requirements` into `folder` (see the module docstring)."""
    dists, missing = closure(read_requirements(requirements))
    folder.mkdir(parents=True, exist_ok=True)
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        files = dist.files
        if files is None:  # no RECORD: the distribution's top-level names only
            tops = {(n, ()) for n in (dist.read_text("top_level.txt") or "").split()}
        else:
            tops = {(f.parts[0], f.parts[1:]) for f in files if f.parts and f.parts[0] != ".."}
        for top in sorted({t for t, _ in tops}):
            src = root / top
            if top.endswith(".pth") or not (src.exists() or src.is_symlink()):
                continue  # .pth files act only in site directories, which -S leaves out
            if src.is_dir() and not (src / "__init__.py").exists() and not top.endswith((".dist-info", ".data")) \
                    and top != "__pycache__":
                # A namespace folder (nvidia/, google/) that several distributions share: link only this one's part.
                (folder / top).mkdir(exist_ok=True)
                for part in sorted({rest[0] for t, rest in tops if t == top and rest}):
                    _link(src / part, folder / top / part)
            elif top != "__pycache__":
                _link(src, folder / top)
    return View(folder, frozenset(dists), frozenset(missing))
