"""The data root's serving config, as the training service adds an exported model's name to it."""

import pytest

from services.common import models_config
from services.serving.config import load_model_config


def test_a_new_name_is_added_once_and_what_was_there_is_kept(tmp_path):
    path = models_config.config_path(tmp_path)
    path.parent.mkdir()
    path.write_text('model_config_list { config { name: "guitar" base_path: "/data/models/guitar" '
                    'model_version_policy { latest { num_versions: 2 } } } }')
    assert models_config.add_model(path, "bass", tmp_path / "models" / "bass")
    assert not models_config.add_model(path, "bass", tmp_path / "models" / "bass")
    assert not models_config.add_model(path, "guitar", tmp_path / "elsewhere")
    specs = {spec.name: spec for spec in load_model_config(path)}
    assert list(specs) == ["guitar", "bass"]
    assert (str(specs["guitar"].base_path), specs["guitar"].latest_count) == ("/data/models/guitar", 2)
    assert specs["bass"].base_path == tmp_path / "models" / "bass"


def test_without_a_config_nothing_is_written(tmp_path):
    """A training service whose data root no server reads: the export stays unserved, quietly."""
    assert not models_config.add_model(models_config.config_path(tmp_path), "bass", tmp_path / "models" / "bass")
    assert not (tmp_path / "serving").exists()
    (tmp_path / "serving").mkdir()
    assert not models_config.add_model(models_config.config_path(tmp_path), "bass", tmp_path / "models" / "bass")
    assert not models_config.config_path(tmp_path).exists()


def test_a_config_that_cannot_be_parsed_is_refused_and_left_as_it_was(tmp_path):
    path = models_config.config_path(tmp_path)
    path.parent.mkdir()
    path.write_text("model_config_list { config { name: ")
    with pytest.raises(models_config.ModelsConfigError, match="not a valid model_config_list"):
        models_config.add_model(path, "bass", tmp_path / "models" / "bass")
    assert path.read_text() == "model_config_list { config { name: "
