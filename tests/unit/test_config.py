"""The daemon configuration: strict TOML, one-line errors, CLI overrides, secrets kept out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import daemon.setting
from daemon.config import (
    AlarmSection,
    Config,
    ConfigError,
    apply_alarm_overrides,
    load_config,
    read_secret,
)
from daemon.manifest import AlarmPolicy

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"model.path": "models/demo.onnx"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "oteo.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEO_MQTT_PASSWORD",
        "STATE_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
        "XDG_STATE_HOME",
    ):
        monkeypatch.delenv(name, raising=False)


def test_example_config_loads() -> None:
    config = load_config(REPO / "examples" / "oteo.toml")
    assert config.model.path == Path("models/demo.onnx")
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("localhost", 1883, False)
    assert config.mqtt.password_file is None  # the secrets are commented-out examples
    assert config.alarm.sensitivity == {"pump-1": 1.5}


def test_example_config_sets_every_section() -> None:
    text = (REPO / "examples" / "oteo.toml").read_text(encoding="utf-8")
    for name, field in Config.model_fields.items():
        assert re.search(rf"^(\[{name}\]|(# )?{name} = )", text, re.M), f"{name} not in the example"
        section = field.annotation
        if isinstance(section, type) and hasattr(section, "model_fields"):
            for key in section.model_fields:
                assert key in text, f"{name}.{key} is not documented in the example"


def test_defaults_need_only_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, MINIMAL)
    assert config.mqtt.url == "mqtt://localhost:1883"
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("localhost", 1883, False)
    assert config.http.bind == "127.0.0.1"
    assert config.instance
    assert config.state_dir == tmp_path / ".local/state/oteo" / config.instance


def test_missing_model_path_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^model: required$"):
        load_config(None)


def test_unknown_key_is_rejected_with_its_dotted_path(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\npath = "m.onnx"\n[mqtt]\nbroker = "x"\n')
    with pytest.raises(ConfigError, match=r"^mqtt\.broker: unknown key$"):
        load_config(path)


def test_several_errors_report_the_first_and_a_count(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\npath = "m.onnx"\nonnx_threads = 0\n[http]\nport = -1\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith("model.onnx_threads: ")
    assert message.endswith("(1 more)")
    assert "\n" not in message


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[model\npath = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: invalid TOML")
    assert "\n" not in str(caught.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml")


def test_non_loopback_bind_needs_a_token_file() -> None:
    with pytest.raises(ConfigError, match=r"^http\.token_file: required when http\.bind"):
        load_config(None, {**MINIMAL, "http.bind": "0.0.0.0"})
    config = load_config(None, {**MINIMAL, "http.bind": "0.0.0.0", "http.token_file": "/t"})
    assert config.http.token_file == Path("/t")


def test_token_is_read_from_its_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc123\n", encoding="utf-8")
    token.chmod(0o600)
    config = load_config(None, {**MINIMAL, "http.bind": "0.0.0.0", "http.token_file": token})
    assert config.http.token() == "abc123"
    token.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^http\.token_file: .* is empty"):
        config.http.token()


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_bind_needs_no_token(bind: str) -> None:
    assert load_config(None, {**MINIMAL, "http.bind": bind}).http.token_file is None


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[model]\npath = "a.onnx"\n[mqtt]\nurl = "mqtt://a:1883"\n[http]\nport = 1\n'
    )
    overrides = {
        "model.path": Path("b.onnx"),
        "mqtt.url": "mqtts://b",
        "http.port": 9200,
        "http.bind": None,  # a CLI option that was not given
    }
    config = load_config(path, overrides)
    assert config.model.path == Path("b.onnx")
    assert (config.mqtt.host, config.mqtt.port) == ("b", 8883)
    assert (config.http.bind, config.http.port) == ("127.0.0.1", 9200)


def test_override_of_an_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^mqtt\.brokr: unknown key$"):
        load_config(None, {**MINIMAL, "mqtt.brokr": "x"})


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("tcp://host:1883", "scheme"),
        ("mqtt://user:secret@host", "password_file"),
        ("mqtt://:1883", "no host"),
        ("mqtt://host:99999", "out of range"),
    ],
)
def test_bad_broker_url_is_refused(url: str, error: str) -> None:
    with pytest.raises(ConfigError, match=rf"^mqtt\.url: .*{error}"):
        load_config(None, {**MINIMAL, "mqtt.url": url})


def test_tls_files_need_an_mqtts_url() -> None:
    with pytest.raises(ConfigError, match=r"^mqtt: .*ca_file.*mqtts://"):
        load_config(None, {**MINIMAL, "mqtt.ca_file": "/ca.pem"})


@pytest.mark.parametrize("instance", ["a/b", "a+b", "a#", "a b", ""])
def test_instance_must_be_topic_safe(instance: str) -> None:
    with pytest.raises(ConfigError, match=r"^instance: "):
        load_config(None, {**MINIMAL, "instance": instance})


def test_password_comes_from_file_and_never_shows(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret-from-file\n", encoding="utf-8")
    secret.chmod(0o600)
    config = load_config(None, {**MINIMAL, "mqtt.password_file": secret})
    assert config.mqtt.password() == "s3cret-from-file"
    assert "s3cret" not in json.dumps(config.redacted())
    assert "s3cret" not in repr(config)
    assert config.redacted()["mqtt"]["password"].startswith("<redacted")


def test_password_comes_from_env_and_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEO_MQTT_PASSWORD", "s3cret-from-env")
    config = load_config(None, MINIMAL)
    assert config.mqtt.password() == "s3cret-from-env"
    assert "s3cret" not in json.dumps(config.redacted())
    assert "s3cret" not in config.model_dump_json()


def test_no_password_anywhere_is_none() -> None:
    config = load_config(None, MINIMAL)
    assert config.mqtt.password() is None
    assert config.redacted()["mqtt"]["password"] is None


def test_unreadable_password_file_names_the_field(tmp_path: Path) -> None:
    config = load_config(None, {**MINIMAL, "mqtt.password_file": tmp_path / "absent"})
    with pytest.raises(ConfigError, match=r"^mqtt\.password_file: cannot read"):
        config.mqtt.password()


def test_plain_password_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\npath = "m.onnx"\n[mqtt]\npassword = "hunter2"\n')
    with pytest.raises(ConfigError, match=r"^mqtt\.password: unknown key"):
        load_config(path)


def test_password_file_under_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mqtt").write_text("from-systemd", encoding="utf-8")
    (tmp_path / "mqtt").chmod(0o400)  # as systemd hands credentials over
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = load_config(None, {**MINIMAL, "mqtt.password_file": "${CREDENTIALS_DIRECTORY}/mqtt"})
    assert config.mqtt.password() == "from-systemd"


def test_unset_variable_in_a_path_is_an_error() -> None:
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        load_config(None, {**MINIMAL, "mqtt.password_file": "${CREDENTIALS_DIRECTORY}/mqtt"})


def test_state_dir_defaults_to_systemd_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/oteo:/var/lib/other")
    assert load_config(None, MINIMAL).state_dir == Path("/var/lib/oteo")


def test_state_dir_defaults_under_xdg_state_home_per_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not ./state: a daemon started from a checkout must not leave state in the working tree."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    config = load_config(None, {**MINIMAL, "instance": "pump-house-1"})
    assert config.state_dir == tmp_path / "oteo" / "pump-house-1"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the XDG spec: ignore it
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, {**MINIMAL, "instance": "a"})
    assert config.state_dir == tmp_path / ".local/state/oteo/a"


def test_state_dir_set_in_the_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/oteo")
    path = write(tmp_path, f'state_dir = "{tmp_path}/s"\n[model]\npath = "m.onnx"\n')
    assert load_config(path).state_dir == tmp_path / "s"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[alarm]\nk = "3"', "alarm.k: Input should be a valid integer"),
        ("[alarm]\nk = true", "alarm.k: Input should be a valid integer"),
        ("[alarm]\nk = 3.0", "alarm.k: Input should be a valid integer"),
        ('[alarm]\nenter_threshold = "2.5"', "alarm.enter_threshold: Input should be a valid"),
        ("[http]\nport = true", "http.port: Input should be a valid integer"),
        ('[http]\nport = "9108"', "http.port: Input should be a valid integer"),
        ("[mqtt]\nqos = true", "mqtt.qos: Input should be 0 or 1"),
        ("[mqtt]\nqos = 1.0", "mqtt.qos: Input should be 0 or 1"),
        ('[topics]\nper_channel = "yes"', "topics.per_channel: Input should be a valid boolean"),
        ("[topics]\nper_channel = 1", "topics.per_channel: Input should be a valid boolean"),
        ('[record]\nstreams = "pump-*"', "record.streams: Input should be a valid list"),
        ('[model]\npath = "m.onnx"\nonnx_threads = 2.0', "model.onnx_threads: Input should be"),
        ("instance = 7", "instance: Input should be a valid string"),
    ],
)
def test_values_are_strictly_typed(tmp_path: Path, toml: str, message: str) -> None:
    model = "" if "[model]" in toml else '\n[model]\npath = "m.onnx"\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, toml + model))
    assert str(caught.value).startswith(message)


def test_integers_are_fine_for_float_fields(tmp_path: Path) -> None:
    """TOML writes 1.0 as `1` as often as not: a number is a number."""
    path = write(
        tmp_path,
        '[model]\npath = "m.onnx"\n[alarm]\nenter_threshold = 3\nsmoothing_alpha = 1\n'
        "[alarm.sensitivity]\npump-1 = 2\n[scoring]\nmax_wait_s = 0\n",
    )
    config = load_config(path)
    assert config.alarm.enter_threshold == 3.0 and isinstance(config.alarm.enter_threshold, float)
    assert config.alarm.sensitivity == {"pump-1": 2.0}
    assert config.scoring.max_wait_s == 0.0


def test_protocol_accepts_a_bare_5(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\npath = "m.onnx"\n[mqtt]\nprotocol = 5\n')
    assert load_config(path).mqtt.protocol == "5"


def test_derived_ingest_timings_follow_the_sample_period() -> None:
    ingest = load_config(None, MINIMAL).ingest
    assert (ingest.gap_s(0.5), ingest.reorder_s(0.5), ingest.stale_s(0.5)) == (2.5, 0.0, 5.0)
    pinned = load_config(None, {**MINIMAL, "ingest.max_gap_s": 7}).ingest
    assert pinned.gap_s(0.5) == 7


POLICY = AlarmPolicy(enter_threshold=2.0, exit_threshold=1.0)


def test_alarm_overrides_replace_only_what_is_set() -> None:
    policy = apply_alarm_overrides(POLICY, AlarmSection(k=4, enter_threshold=3.0))
    assert (policy.k, policy.enter_threshold) == (4, 3.0)
    assert (policy.n, policy.exit_threshold, policy.hop) == (POLICY.n, 1.0, POLICY.hop)


def test_alarm_overrides_are_validated_against_the_model_policy() -> None:
    with pytest.raises(ConfigError, match=r"^alarm: k \(9\) must not exceed n \(5\)"):
        apply_alarm_overrides(POLICY, AlarmSection(k=9))


def test_alarm_section_covers_every_policy_field() -> None:
    assert set(AlarmPolicy.model_fields) <= set(AlarmSection.model_fields)


@pytest.mark.parametrize(("mode", "accepted"), [(0o600, True), (0o640, True), (0o644, False)])
def test_secret_files_readable_by_everyone_are_refused(
    tmp_path: Path, mode: int, accepted: bool
) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n", encoding="utf-8")
    secret.chmod(mode)
    cfg = load_config(None, {**MINIMAL, "mqtt.username": "u", "mqtt.password_file": str(secret)})
    if accepted:
        cfg.check_secrets()
        assert cfg.mqtt.password() == "s3cret"
    else:
        with pytest.raises(ConfigError, match=r"mqtt.password_file: .* readable by every user"):
            cfg.check_secrets()


def test_container_secret_mounts_may_be_readable_by_everyone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compose bind-mounts a secret with the host file's mode; the container is the boundary."""
    monkeypatch.setattr(daemon.setting, "CONTAINER_SECRETS", tmp_path)
    secret = tmp_path / "http-token"
    secret.write_text("t0ken\n", encoding="utf-8")
    secret.chmod(0o644)
    assert read_secret("http.token_file", secret) == "t0ken\n"


def test_a_missing_secret_file_names_the_field(tmp_path: Path) -> None:
    cfg = load_config(None, {**MINIMAL, "http.token_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"^http.token_file: cannot read .*nope"):
        cfg.check_secrets()
