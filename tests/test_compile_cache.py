import os
from pathlib import Path

from lafq import compile_cache


def test_cache_lives_in_the_project_cache_directory_not_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("LAFQ_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_root() == tmp_path / "xdg" / "lafq"
    monkeypatch.setenv("LAFQ_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.cache_root() == tmp_path / "mine"


def test_enable_points_inductor_at_the_cache_unless_the_user_chose_a_directory(monkeypatch, tmp_path):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("LAFQ_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    assert compile_cache.enable() == tmp_path / "inductor" and (tmp_path / "inductor").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    assert compile_cache.enable() == Path(tmp_path / "theirs")


def test_importing_absent_artifacts_is_a_no_op(tmp_path):
    assert compile_cache.import_artifacts(tmp_path / "none.bin") is False
