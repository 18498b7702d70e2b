"""`python -m lafq space build|push`: what the Hub accepts, checked with git itself; push up to the network."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lafq import space

REPO = Path(__file__).resolve().parent.parent
MB10 = 10 * 1024 * 1024


@pytest.fixture(scope="module", params=sorted(space.HARDWARE))
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / request.param
    r = space.build(out, request.param)
    return request.param, out, r


def git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def git_binary(path: Path) -> bool:
    """Git's own verdict, without any attributes: numstat prints '-' for a binary file."""
    r = subprocess.run(["git", "diff", "--no-index", "--numstat", "/dev/null", str(path)], cwd=path.parent,
                       capture_output=True, text=True, env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"})
    return r.stdout.startswith("-\t-\t")


def test_every_binary_file_of_a_built_space_is_lfs_tracked_and_no_plain_file_exceeds_10_mb(built):
    hardware, out, _ = built
    git(out, "init", "-q")
    files = git(out, "ls-files", "--others", "--exclude-standard").split()
    assert "app.py" in files and ".gitattributes" in files
    attrs = {}
    for line in git(out, "check-attr", "filter", "--", *files).splitlines():
        path, _, value = line.split(": ")
        attrs[path] = value
    binaries = [f for f in files if git_binary(out / f)]
    assert "checkpoints/unet.safetensors" in binaries  # the check does see binaries
    assert [f for f in binaries if attrs[f] != "lfs"] == []
    assert [f for f in files if attrs[f] != "lfs" and (out / f).stat().st_size > MB10] == []


def test_a_built_space_holds_what_the_app_reads_and_not_the_training_state(built):
    hardware, out, r = built
    for f in space.APP_FILES:
        assert (out / f).is_file(), f
    assert (out / "demo" / "ui.py").is_file() and (out / "lafq" / "space.py").is_file()
    assert not (out / "checkpoints" / "train_state.safetensors").exists() and not (out / "tests").exists()
    assert r.bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and ".git" not in p.parts)
    fashion = sum((out / f).stat().st_size for f in space.optional_app_files(space.REPO))
    assert r.bytes - fashion < 25e6  # the model, its Fisher map (13 MB), the classifier, MNIST and code


def test_the_fashion_model_folder_is_copied_when_the_project_has_it(tmp_path):
    repo = tmp_path / "repo"
    for f in space.APP_FILES:  # a stand-in project: the app's files (empty) and a fashion folder
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_bytes(b"")
    (repo / "requirements.txt").write_text((space.REPO / "requirements.txt").read_text())
    fashion = repo / "checkpoints" / "fashion"
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "lafq.json", "fisher.safetensors", "stats/fashion-test-classifier-0.npz", "notes/train_log.jsonl"):
        (fashion / f).parent.mkdir(parents=True, exist_ok=True)
        (fashion / f).write_text("{}")
    listed = space.optional_app_files(repo)
    assert "checkpoints/fashion/notes/train_log.jsonl" not in listed and len(listed) == 6
    space.build(tmp_path / "out", "cpu-basic", repo=repo)
    for f in listed:
        assert (tmp_path / "out" / f).is_file(), f
    assert space.optional_app_files(tmp_path / "nothing") == []


def test_the_front_matter_parses_and_names_existing_files(built):
    from huggingface_hub import SpaceHardware, metadata_load

    hardware, out, _ = built
    meta = metadata_load(out / "README.md")  # the Hub library's own reader
    assert meta == space.read_front_matter(out)
    for key in ("sdk", "sdk_version", "python_version", "app_file", "short_description", "suggested_hardware",
                "license"):
        assert meta.get(key) not in (None, ""), key
    assert meta["sdk"] == "gradio" and (out / meta["app_file"]).is_file()
    assert len(meta["short_description"]) <= 60
    assert meta["suggested_hardware"] in {h.value for h in SpaceHardware}
    import gradio
    assert meta["sdk_version"] == gradio.__version__


def test_each_hardware_gets_its_requirements_and_python(built):
    hardware, out, _ = built
    reqs = (out / "requirements.txt").read_text()
    meta = space.read_front_matter(out)
    if hardware == "zero-gpu":
        assert "torch==2.9.1" in reqs and "torchvision==0.24.1" in reqs and space.SPACES_PIN in reqs
        assert meta["python_version"] in ("3.10.13", "3.12.12") and meta["suggested_hardware"] == "zero-a10g"
    else:
        project = (REPO / "requirements.txt").read_text()
        assert [line for line in reqs.splitlines() if not line.startswith("#")] == \
            [line.split("#")[0].strip() for line in project.splitlines() if line.split("#")[0].strip()]
        assert meta["python_version"] == "3.11" and meta["suggested_hardware"] == "cpu-basic"


def run_cli(*args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "lafq", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_build_refuses_a_folder_with_files_unless_forced(tmp_path):
    out = tmp_path / "space"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run_cli("space", "build", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: {out} exists and is not an empty folder; pass --force to replace it, "
                                "or choose another OUT")
    assert (out / "keep.txt").exists()
    r = run_cli("space", "build", str(out), "--force", "--hardware", "cpu-basic", "--json")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "app.py").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["space"]  # no temporary folder left beside it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cpu_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "space"
    space.build(out, "cpu-basic")
    return out


def test_push_without_a_token_says_how_to_get_one(cpu_folder, tmp_path):
    env = {"HF_HOME": str(tmp_path), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    r = run_cli("space", "push", str(cpu_folder), "--repo", "someone/lafq", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"


def test_push_to_an_unreachable_hub_fails_in_one_line(cpu_folder, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused, no traffic leaves the machine
    env = {"HF_HOME": str(tmp_path), "HF_TOKEN": "hf_" + "x" * 34, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint,
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    r = run_cli("space", "push", str(cpu_folder), "--repo", "someone/lafq", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: cannot reach the Hugging Face Hub ({endpoint})")


@pytest.mark.parametrize("args, message", [
    (["--repo", "no-slash"], "error: --repo must look like user/name"),
    (["--repo", "a/b/c"], "error: --repo must look like user/name"),
])
def test_push_checks_the_repo_id_before_the_network(cpu_folder, args, message):
    r = run_cli("space", "push", str(cpu_folder), *args)
    assert r.returncode == 2 and r.stderr.startswith(message)


def test_push_refuses_a_folder_that_is_not_a_built_space(tmp_path):
    r = run_cli("space", "push", str(tmp_path), "--repo", "someone/lafq")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {tmp_path} has no README.md; build the folder first with `python -m lafq space build {tmp_path}`")


def test_push_calls_create_repo_and_upload_folder_as_a_gradio_space(cpu_folder, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/spaces/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_from_login")
    assert space.push(cpu_folder, "someone/lafq") == "https://huggingface.co/spaces/someone/lafq"
    assert calls[0] == ("token", "hf_from_login")
    assert calls[1][2]["repo_type"] == "space" and calls[1][2]["space_sdk"] == "gradio"
    assert calls[1][2]["space_hardware"] == "cpu-basic" and calls[1][2]["exist_ok"] is True
    assert calls[2][1]["folder_path"] == str(cpu_folder) and calls[2][1]["repo_type"] == "space"


def test_a_build_killed_mid_way_is_undone_by_the_next_one(tmp_path):
    """kill -9 can strike between the two renames (the old OUT moved aside, the new one not yet in place) or
    while copying (a half-built hidden folder): the next build puts the old OUT back and deletes the copies."""
    out = tmp_path / "space"
    aside = tmp_path / ".space.lafq-old-ab12cd34" / "x"
    aside.mkdir(parents=True)
    (aside / "app.py").write_text("# the earlier build")
    (tmp_path / ".space.lafq-build-q1w2e3r4").mkdir()  # a half-built copy
    (tmp_path / ".space.lafq-build-q1w2e3r4" / "big.bin").write_bytes(b"0" * 1000)
    for mine in (".space.keep", ".space.old.2024"):  # not names a build makes (a backup by hand): left alone
        (tmp_path / mine).mkdir()
    with pytest.raises(space.SpaceError, match="exists and is not an empty folder"):
        space.build(out, "cpu-basic")  # without --force the restored folder is kept as it is
    assert (out / "app.py").read_text() == "# the earlier build"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".space.keep", ".space.old.2024", "space"]
    space.build(out, "cpu-basic", force=True)
    assert "the earlier build" not in (out / "app.py").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".space.keep", ".space.old.2024", "space"]
