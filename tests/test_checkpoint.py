import numpy as np
import pytest

from tests.conftest import SAMPLE
from trainer.config import Config
from trainer.model.network import build_model, preprocess
from trainer.train import checkpoint
from trainer.train.checkpoint import CheckpointError


def fresh_model(cfg):
    model = build_model(cfg)
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture(scope="module")
def trained():
    cfg = Config(seed=1)
    with np.load(SAMPLE) as npz:
        x, y = preprocess(npz["x_train"][:256], npz["y_train"][:256])
    model = fresh_model(cfg)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    return cfg, model


def test_round_trip_restores_weights_and_rmsprop_slots(tmp_path, trained):
    cfg, model = trained
    history = [{"epoch": 1, "loss": 0.5}]
    checkpoint.save(str(tmp_path), model, 1, cfg.to_dict(), history)
    restored = fresh_model(Config(seed=2))
    meta = checkpoint.load(str(tmp_path), restored)
    assert meta == {"epochs_done": 1, "config": cfg.to_dict(), "history": history}
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    slots = [np.asarray(v) for v in model.optimizer.variables]
    assert any(np.abs(s).sum() > 0 for s in slots[1:])  # RMSprop's velocities are really there
    for a, b in zip(slots, restored.optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_truncated_state_gives_a_clear_error_naming_the_checkpoint(tmp_path, trained):
    cfg, model = trained
    checkpoint.save(str(tmp_path), model, 1, cfg.to_dict(), [])
    state = tmp_path / checkpoint.STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path} is unreadable"):
        checkpoint.load(str(tmp_path), fresh_model(cfg))


def test_checkpoint_of_another_model_is_refused(tmp_path, trained):
    cfg, model = trained
    checkpoint.save(str(tmp_path), model, 1, cfg.to_dict(), [])
    with pytest.raises(CheckpointError, match="the model has"):
        checkpoint.load(str(tmp_path), fresh_model(Config(model="cnn")))
