from pathlib import Path

from tasks.core import stage_cache


def test_a_record_is_reused_only_while_its_outputs_match(tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"weights-v1")
    stage_cache.store(tmp_path, "k" * 64, [out], {"steps": 10})
    assert stage_cache.lookup(tmp_path, "k" * 64) == {"steps": 10}
    assert stage_cache.lookup(tmp_path, "x" * 64) is None  # another key

    out.write_bytes(b"weights-v2")  # corrupted or replaced
    assert stage_cache.lookup(tmp_path, "k" * 64) is None
    out.unlink()  # deleted
    assert stage_cache.lookup(tmp_path, "k" * 64) is None


def test_a_truncated_record_is_a_miss(tmp_path):
    out = tmp_path / "a"
    out.write_text("x")
    path = stage_cache.store(tmp_path, "k" * 64, [out], {})
    Path(path).write_text('{"key": ')
    assert stage_cache.lookup(tmp_path, "k" * 64) is None


def test_training_key_follows_training_config_not_eval_config(tmp_path):
    from tokenmill.config import resolve_config

    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    base = resolve_config("tiny")
    same = stage_cache.train_key(manifest, base, None)
    assert stage_cache.train_key(manifest, resolve_config("tiny", overrides={"eval": {"max_rows": 7}}), None) == same
    assert stage_cache.train_key(manifest, resolve_config("tiny", overrides={"train": {"lr": 1e-4}}), None) != same
    manifest.write_text('{"changed": true}')
    assert stage_cache.train_key(manifest, base, None) != same
