"""The token file a local Ray uses is owner-only from the start (trainer/train/cluster.py's
owner_only_token), with no Ray: the file's creation, a loose file made owner-only, and what the
user chose left alone."""

import stat

import pytest

from trainer.train.cluster import owner_only_token


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_token_file_is_created_owner_only_with_a_256_bit_token(home):
    assert owner_only_token() is None
    token = home / ".ray" / "auth_token"
    assert mode(token) == 0o600 and mode(token.parent) == 0o700
    assert len(token.read_text()) == 64 and int(token.read_text(), 16) >= 0
    before = token.read_text()
    assert owner_only_token() is None and token.read_text() == before  # kept, not made again


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604])
def test_a_token_file_others_can_read_is_made_owner_only_and_said_so(home, loose):
    token = home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(loose)
    notice = owner_only_token()
    assert mode(token) == 0o600 and token.read_text() == "a" * 64
    assert notice == (f"note: Ray's token file {token} could be read by others (mode {loose:o}); it is owner-only "
                      "now (600). Anyone who read it holds the token: remove the file for a new one")


def test_the_users_own_choices_are_left_alone(home, monkeypatch):
    token = home / "elsewhere" / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert owner_only_token() is None and mode(token) == 0o600  # their path, owner-only too
    monkeypatch.setenv("RAY_AUTH_TOKEN", "b" * 64)  # a token in the environment: no file at all
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert owner_only_token() is None and not (home / ".ray").exists()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token auth asked for
    assert owner_only_token() is None and not (home / ".ray").exists()
